"""The simulation driver: the one round loop, and the public :func:`run` API.

This is the wiring layer, the only module of ``fedsim`` that imports :mod:`actors`. Per round
it samples clients (seeded), hands every client task the object-store reference of the global
adapter, has the server actor validate and merge the updates in client-id order, evaluates the
new global adapter on the global test set and logs the round to MLflow.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from actors.client import ClientTask, merger_options
from actors.pool import ClientPool, pool_size, start_server
from actors.server import ServerOptions
from aggregation import SERVER_OPTIMIZERS, get_merger, lora_rank, shared_keys, unfold_scaling
from fedsim.adapter_io import save_peft_adapter
from fedsim.config import ConfigError, FedSimConfig, as_config, resolve_ranks
from fedsim.data.federated import FederatedData, load_dataset
from fedsim.data.partition import sample_clients
from fedsim.evaluation import classification_metrics, summarize
from fedsim.models.lora import client_scaling
from fedsim.objectives import objective_spec
from fedsim.progress import RoundProgress
from fedsim.tracking import Tracker, plot_history


@dataclass
class RunResult:
    """What a simulation produced.

    Attributes:
        run_id: the MLflow run id.
        tracking_uri: the MLflow store it was logged to.
        history: one dict of metrics per round, round 0 (before training) first.
        clients: per round, one row per sampled client (report, status).
    """

    run_id: str
    tracking_uri: str
    history: list[dict[str, float]] = field(default_factory=list)
    clients: list[list[dict]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        """Metrics of the last round."""
        return self.history[-1]


def init_ray() -> bool:
    """Join the Ray cluster that ``RAY_ADDRESS`` names, or start a local one.

    Returns:
        Whether this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": env},
    )
    return True


def _check_ranks(ranks: list[int], max_rank: int) -> None:
    for cid, r in enumerate(ranks):
        if r > max_rank:
            raise ConfigError(
                "clients.ranks",
                f"client {cid} has rank {r} but the backbone's LoRA target modules admit at "
                f"most rank {max_rank}",
            )


def server_options(cfg: FedSimConfig, keys: list[str]) -> ServerOptions:
    """The server-side choices of ``cfg`` (sharing, server optimiser, FedNova, SCAFFOLD)."""
    spec = objective_spec(cfg.objective.method)
    return ServerOptions(
        shared=tuple(shared_keys(keys, cfg.sharing.policy)),
        optimizer=server_optimizer(cfg.server),
        fednova=spec.rescale_by_steps,
        scaffold_clients=cfg.clients.num if spec.control_variates else None,
    )


def server_optimizer(cfg) -> object:
    """The configured server optimiser, given only the options its class takes."""
    import inspect

    cls = SERVER_OPTIMIZERS[cfg.optimizer]
    accepted = inspect.signature(cls).parameters
    values = {"lr": cfg.lr, "beta1": cfg.beta1, "beta2": cfg.beta2, "tau": cfg.tau}
    return cls(**{k: v for k, v in values.items() if k in accepted and v is not None})


def concat_stacks(stacks: list[dict]) -> dict:
    """FLoRA's rounds as one adapter: A rows and B columns concatenated in round order."""
    out = {}
    for k in stacks[0]:
        axis = 0 if k.endswith("lora_A.weight") else 1
        out[k] = torch.cat([s[k] for s in stacks], dim=axis)
    return out


def _global_metrics(outcome) -> dict[str, float]:
    shards = [outcome.values[s] for s in sorted(outcome.values)]
    y = np.concatenate([s[0] for s in shards])
    p = np.concatenate([s[1] for s in shards])
    losses = np.concatenate([s[2] for s in shards])
    probs = np.concatenate([s[3] for s in shards])
    return {f"global/{k}": v for k, v in classification_metrics(y, p, losses, probs).items()}


def _round_metrics(reports: list[dict], rejected: dict[int, str], failed: dict) -> dict:
    ok = [r for r in reports if r["client_id"] not in rejected]
    m: dict[str, float] = {
        "clients/sampled": len(reports) + len(failed),
        "clients/failed": len(failed),
        "clients/rejected": len(rejected),
        "comm/upload_bytes": sum(r["upload_bytes"] for r in reports),
        "comm/download_bytes": sum(r["download_bytes"] for r in reports),
        "editing/edited_tensors": sum(len(r["edited"]) for r in reports),
    }
    if ok:
        # AUC is undefined on a held-out split with one class: summarise the clients that have it
        names = dict.fromkeys(k for r in ok for k in r["personalized"])
        for metric in names:
            stats = summarize(
                [r["personalized"][metric] for r in ok if metric in r["personalized"]]
            )
            for stat, value in stats.items():
                m[f"personalized/{metric}_{stat}"] = value
        m["train/loss_mean"] = float(np.mean([r["train_loss"] for r in ok]))
    sims = [v for r in reports for v in r["similarities"].values()]
    if sims:
        m["editing/similarity_mean"] = float(np.mean(sims))
        m["editing/similarity_min"] = float(np.min(sims))
    return m


def _client_rows(reports: list[dict], rejected: dict[int, str], failed: dict) -> list[dict]:
    rows = []
    for r in sorted(reports, key=lambda r: r["client_id"]):
        status = f"rejected: {rejected[r['client_id']]}" if r["client_id"] in rejected else "ok"
        rows.append(
            {
                "client_id": r["client_id"],
                "rank": r["rank"],
                "num_samples": r["num_samples"],
                "steps": r["steps"],
                "train_loss": r["train_loss"],
                **{f"personalized_{k}": v for k, v in r["personalized"].items()},
                "edited_tensors": len(r["edited"]),
                "min_similarity": min(r["similarities"].values(), default=float("nan")),
                "time_s": r["time_s"],
                "node_id": r["node_id"],
                "status": status,
            }
        )
    for cid, reason in sorted(failed.items()):
        rows.append({"client_id": cid, "status": f"failed: {reason}"})
    return rows


def run(config: FedSimConfig | dict | str | Path | None = None) -> RunResult:
    """Run one federated simulation and log it to MLflow.

    Args:
        config: a :class:`FedSimConfig`, a dict of values over the defaults, a YAML path, or
            None for the defaults.

    Returns:
        The MLflow run id and the per-round metrics.

    Raises:
        ConfigError: a config value is not allowed (including ranks the backbone cannot take).
    """
    cfg = as_config(config)
    ranks = resolve_ranks(cfg.clients, cfg.seed)
    per_round = len(sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, 1))
    # Build the dataset cache and check the split here, once, before any actor starts: a
    # split that cannot be made is a config error, not N dead actors.
    FederatedData(cfg, load_dataset(cfg))
    started = init_ray()
    pool = server = tracker = None
    try:
        pool = ClientPool(cfg, pool_size(cfg, per_round))
        info = pool.call_first("describe")
        _check_ranks(ranks, info["max_rank"])
        initial = pool.call_first("initial_global")
        server = start_server(
            get_merger(cfg.aggregation.method, **merger_options(cfg)),
            initial,
            server_options(cfg, list(initial)),
        )
        tracker = Tracker(cfg)
        result = RunResult(tracker.run_id, tracker.uri)
        progress = RoundProgress(cfg.rounds, enabled=cfg.progress)
        _loop(cfg, ranks, pool, server, tracker, result, progress)
        progress.close()
        _finish(cfg, info, server, tracker, result, max(ranks))
        tracker.finish()
        if cfg.progress:
            progress.summary(result.history, tracker.run_id, tracker.ui_command())
        return result
    except BaseException as exc:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if server is not None:
            ray.kill(server)
        if started:
            ray.shutdown()


def _loop(cfg, ranks, pool, server, tracker, result: RunResult, progress) -> None:
    """The round loop: round 0 evaluates the initial adapter, rounds 1..T train."""
    ranks = list(ranks)  # current ranks: self-pruning may lower them
    start = time.perf_counter()
    states: dict[int, object] = {}  # client id -> object ref of its persistent state
    metrics = _global_metrics(pool.evaluate(server.broadcast.remote()))
    metrics["time/round_s"] = time.perf_counter() - start
    tracker.log_metrics(metrics, step=0)
    result.history.append({"round": 0, **metrics})
    result.clients.append([])
    progress.update(0, metrics)
    for t in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        sampled = sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, t)
        broadcast = server.broadcast.remote()  # one object in the store, shared by all tasks
        outcome = pool.train([ClientTask(c, ranks[c], t) for c in sampled], broadcast, states)
        done = sorted(outcome.values)
        reports = [outcome.values[c] for c in done]
        for c in done:
            states[c] = outcome.refs[c][2]
        meta = [(c, r["rank"], r["num_samples"], r["steps"]) for c, r in zip(done, reports)]
        for c, r in zip(done, reports):  # HetLoRA self-pruning: the rank from the next round on
            ranks[c] = r["next_rank"] or ranks[c]
        refs = [outcome.refs[c][0] for c in done]
        if objective_spec(cfg.objective.method).control_variates:
            refs += [outcome.refs[c][1] for c in done]
        agg = ray.get(server.aggregate_packed.remote(t, meta, *refs))
        for cid, reason in agg.rejected.items():
            print(f"round {t}: update of client {cid} rejected: {reason}", flush=True)
        metrics = _round_metrics(reports, agg.rejected, outcome.failed)
        metrics["clients/rank_mean"] = float(np.mean(ranks))
        metrics.update(_global_metrics(pool.evaluate(server.broadcast.remote())))
        metrics["time/aggregate_s"] = agg.aggregate_s
        metrics["time/round_s"] = time.perf_counter() - start
        rows = _client_rows(reports, agg.rejected, outcome.failed)
        tracker.log_metrics(metrics, step=t)
        tracker.log_table(rows, f"clients/round_{t:04d}.json")
        result.history.append({"round": t, **metrics})
        result.clients.append(rows)
        progress.update(t, metrics)


def _finish(cfg, info, server, tracker, result: RunResult, global_rank: int) -> None:
    """Log the final global adapter (peft format) and the plots."""
    if cfg.tracking.save_adapter:
        state = ray.get(server.get_global.remote())
        stacked = ray.get(server.stacked_history.remote())
        rank = global_rank
        if stacked:  # FLoRA: the base updates are the sum of every round's stacked product
            state = {**state, **concat_stacks(stacked)}
            rank = lora_rank(state)
        state = unfold_scaling(state, client_scaling(cfg.lora, rank, rank))
        with tempfile.TemporaryDirectory(prefix="fedsim-") as tmp:
            save_peft_adapter(state, tmp, cfg, info["target_modules"], rank, rank)
            tracker.log_dir(tmp, "global_adapter")
    if cfg.tracking.plots:
        import matplotlib.pyplot as plt

        fig = plot_history(result.history)
        tracker.log_figure(fig, "plots/curves.png")
        plt.close(fig)
        sims = [
            r["min_similarity"] for rows in result.clients for r in rows if "min_similarity" in r
        ]
        sims = [s for s in sims if s == s]
        if sims:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.hist(sims, bins=30)
            ax.set_xlabel("lowest cosine similarity to the global adapter, per client update")
            ax.set_ylabel("client updates")
            fig.tight_layout()
            tracker.log_figure(fig, "plots/editing_similarity.png")
            plt.close(fig)
