"""MLflow tracking: one run per simulation, metrics per round at ``step=round``.

Only the driver writes. The run holds the flattened config as params, the resolved config as
YAML, per-round per-client tables, the final global adapter in peft's format and PNG plots.
Once the run exists, a store that fails mid-run is a warning, not a failed run
(:mod:`fedsim.tracking.store_loss`).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from fedsim.config import FedSimConfig, config_digest, flatten, to_yaml, tracking_uri
from fedsim.tracking.store_loss import GuardedClient, StoreLoss
from fedsim.version import __version__, source_commit


def quiet_mlflow() -> None:
    # MLflow prints a banner per run and warns about git; a simulation prints its own summary.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs a database error with its whole traceback before raising it as an
    # MlflowException; fedsim reports the exception itself, on one line
    logging.getLogger("mlflow").getChild("store.db.utils").setLevel(logging.CRITICAL)


# MLflow 3 marks what an experiment is for with this tag (the API, and UIs that read it; 3.17's
# UI picks its GenAI or training view from the address instead: see Tracker.ui_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# Logged by every round (whatever eval.every): the round's metrics reached the store
ROUND_METRIC = "time/round_s"
TRAINING_KIND = "custom_model_development"


def _ranks_label(cfg: FedSimConfig) -> str:
    from fedsim.config import resolve_ranks

    ranks = resolve_ranks(cfg.clients, cfg.seed)
    if len(set(ranks)) == 1:
        return f"rank {ranks[0]}"
    spec = str(cfg.clients.ranks)
    if len(spec) <= 24 and not spec.replace(",", "").isdigit():
        return f"ranks {spec}"  # a named spec: fedilora, choice:4,8,16
    return f"ranks {min(ranks)}-{max(ranks)}"


def method_label(cfg: FedSimConfig) -> str:
    """What trained, in one token: the merge plus every method switched on over the plain
    FedAvg client (e.g. ``fedilora+editing``, ``zeropad+fedprox+fedadam``)."""
    from fedsim.config.registry import enabled_methods

    parts = [cfg.aggregation.method]
    if cfg.objective.method != "plain":
        parts.append(cfg.objective.method)
    if cfg.server.optimizer != "fedavg":
        parts.append(cfg.server.optimizer)
    if cfg.sharing.policy != "all":
        parts.append(f"share-{cfg.sharing.policy}")
    skip = {"sharing", "objective", "server", cfg.objective.method, cfg.server.optimizer}
    parts += [m.name for m in enabled_methods(cfg) if m.name not in skip and m.name not in parts]
    return "+".join(parts)


def default_run_name(cfg: FedSimConfig) -> str:
    """A run name that says what ran: method, ranks, scenario, seed."""
    return f"{method_label(cfg)}, {_ranks_label(cfg)}, {cfg.data.scenario}, seed {cfg.seed}"


def run_tags(cfg: FedSimConfig) -> dict[str, str]:
    """Tags to filter and group runs by in the UI (``tags."fedsim.merge" = 'zeropad'``)."""
    backbone = cfg.model.backbone
    hub = getattr(cfg.model, "name_or_path", None)
    return {
        "fedsim.method": method_label(cfg),
        "fedsim.merge": cfg.aggregation.method,
        "fedsim.objective": cfg.objective.method,
        "fedsim.server_optimizer": cfg.server.optimizer,
        "fedsim.sharing": cfg.sharing.policy,
        "fedsim.scenario": cfg.data.scenario,
        "fedsim.dataset": cfg.data.dataset,
        "fedsim.backbone": f"{backbone} ({hub})" if hub else backbone,
        "fedsim.ranks": _ranks_label(cfg).split(" ", 1)[1],
        "fedsim.clients": str(cfg.clients.num),
        "fedsim.seed": str(cfg.seed),
    }


def provenance_tags() -> dict[str, str]:
    """What code made a run: ``fedsim.version`` always; from a git checkout also
    ``mlflow.source.git.commit`` (the UI shows it as the run's source version) and
    ``fedsim.source.dirty`` (``true`` when tracked files differed from that commit)."""
    tags = {"fedsim.version": __version__}
    found = source_commit()
    if found is not None:
        commit, dirty = found
        tags["mlflow.source.git.commit"] = commit
        tags["fedsim.source.dirty"] = "true" if dirty else "false"
    return tags


def run_description(cfg: FedSimConfig) -> str:
    """The run's note (the UI's Description), markdown."""
    d = cfg.data
    return (
        f"fedsim: **{method_label(cfg)}** on `{d.dataset}` with `{cfg.model.backbone}`; "
        f"{cfg.clients.num} clients ({_ranks_label(cfg)}), {cfg.clients.fraction:g} sampled per "
        f"round, {cfg.rounds} rounds; Dirichlet alpha {d.alpha:g}, scenario `{d.scenario}`; "
        f"seed {cfg.seed}. The resolved config is the artifact `config.yaml`; the data split "
        "is under `data/`."
    )


def training_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing, tagged as a training experiment
    (an existing experiment's own kind, if it has one, is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


class Tracker:
    """An MLflow run for one simulation.

    Args:
        cfg: the resolved config (its ``tracking`` section picks the store and experiment).
        run_name: overrides ``tracking.run_name``.
        log_config: log the config as params and YAML (False for a study's parent run).
    """

    def __init__(self, cfg: FedSimConfig, run_name: str | None = None, log_config: bool = True):
        quiet_mlflow()
        self.cfg = cfg
        self.uri = tracking_uri(cfg.tracking.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp_id = training_experiment(self.client, cfg.tracking.experiment)
        tags = (
            {"mlflow.parentRunId": cfg.tracking.parent_run_id} if cfg.tracking.parent_run_id else {}
        )
        tags.update(provenance_tags())
        if log_config:  # a parent run of a study is no simulation: its children carry these
            tags.update(run_tags(cfg))
            tags["fedsim.config_digest"] = config_digest(cfg)
            tags["mlflow.note.content"] = run_description(cfg)
        name = run_name or cfg.tracking.run_name or (default_run_name(cfg) if log_config else None)
        run = self.client.create_run(exp_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self.reopened = False
        self.experiment_id = exp_id
        self.system_metrics = None
        self.logged = -1  # the last round whose metrics the store took
        if log_config:
            params = {k: str(v)[:6000] for k, v in flatten(cfg).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self.client.log_batch(
                    self.run_id,
                    params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]],
                )
            self.log_text(to_yaml(cfg), "config.yaml")
        self._guard()

    def _guard(self) -> None:
        """From here on a failing store is a warning (the run exists; the start-up's own
        writes raised, as a store that cannot be written to at all is a config error)."""
        self.client = GuardedClient(self.client, self.uri, lambda: self.logged + 1)

    @property
    def lost(self) -> StoreLoss | None:
        """When and why the store failed during the run; None while it takes every write."""
        return getattr(self.client, "lost", None)

    @classmethod
    def reopen(cls, cfg: FedSimConfig, run_id: str, resumed_round: int) -> Tracker:
        """Continue an existing run (``fedsim run --resume``): same run id, status RUNNING.

        Raises:
            ConfigError: the store has no such run (the message names the store and run).
        """
        from mlflow.exceptions import MlflowException

        from fedsim.config import ConfigError

        quiet_mlflow()
        self = cls.__new__(cls)
        self.cfg = cfg
        self.uri = tracking_uri(cfg.tracking.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                "tracking.uri",
                f"MLflow run {run_id} of the checkpoint is not in the store {self.uri}; resume "
                "from the directory the run was started in, pass tracking.uri=, or continue "
                "into a new MLflow run with --new-run",
            ) from None
        self.run_id = run_id
        self.reopened = True
        self.system_metrics = None
        self.experiment_id = run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "fedsim.resumed_from_round", str(resumed_round))
        # a resumed run may have more rounds: its digest says what it ran to the end
        self.client.set_tag(run_id, "fedsim.config_digest", config_digest(cfg))
        self.logged = self.last_step(ROUND_METRIC)
        self._guard()
        return self

    @classmethod
    def continue_parent(cls, cfg: FedSimConfig, run_id: str) -> Tracker:
        """Continue a study's parent run (``fedsim compare --resume``): same run id, status
        RUNNING again; it logs no config (its child runs do)."""
        quiet_mlflow()
        self = cls.__new__(cls)
        self.cfg = cfg
        self.uri = tracking_uri(cfg.tracking.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        run = self.client.get_run(run_id)
        self.run_id = run_id
        self.reopened = True
        self.system_metrics = None
        self.experiment_id = run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        self.logged = -1
        self._guard()
        return self

    def last_step(self, metric: str) -> int:
        """The highest step logged for ``metric`` (-1 if none)."""
        history = self.client.get_metric_history(self.run_id, metric)
        return max((m.step for m in history), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log a round's metrics at ``step``."""
        import time

        ts = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        if self.lost is None and ROUND_METRIC in metrics:  # a round's metrics, not a side metric
            self.logged = max(self.logged, step)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_table(self, rows: list[dict], path: str) -> None:
        """Log rows as an MLflow table artifact (JSON, shown in the UI's artifact view)."""
        if rows:
            columns = list(rows[0])
            data = {c: [r.get(c) for r in rows] for c in columns}
            self.client.log_table(self.run_id, data=data, artifact_file=path)

    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, figure, path: str) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def start_system_metrics(self) -> None:
        """Sample the driver's machine into the run every ``tracking.system_metrics_interval_s``
        (a resumed run continues the steps); see :mod:`fedsim.tracking.system_metrics`."""
        if not self.cfg.tracking.system_metrics or self.system_metrics is not None:
            return
        from fedsim.tracking.system_metrics import SystemMetrics, driver_label

        first = SystemMetrics.next_step(self.client, self.run_id) if self.reopened else 0
        self.system_metrics = SystemMetrics(
            self.client,
            self.run_id,
            self.cfg.tracking.system_metrics_interval_s,
            first,
            label=driver_label(),
        )

    def finish(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status``. A KILLED run (Ctrl-C, SIGTERM) is under a grace
        period: its system metrics stop without a last sample."""
        if self.system_metrics is not None:
            self.system_metrics.stop(tail=status != "KILLED")
        self.client.set_terminated(self.run_id, status=status)

    def discard(self) -> None:
        """Delete the run (MLflow's soft delete): a run that a config error stopped before
        round 0 was never a run. The run is created while the actors start, so an error they
        find (ranks above the backbone's) comes after it."""
        self.finish("FAILED")
        self.client.delete_run(self.run_id)

    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def ui_url(self, base: str = "http://127.0.0.1:5000", whole_experiment: bool = False) -> str:
        """The run's page (or its experiment's runs table) in the MLflow UI's training view.

        MLflow 3.17's UI opens the GenAI view unless the address asks for the training one
        (``workflowType=machine_learning``; it then remembers the choice), whatever the
        experiment's ``mlflow.experimentKind`` tag says.
        """
        if self.uri.startswith(("http://", "https://")):
            base = self.uri.rstrip("/")
        page = f"{base}/#/experiments/{self.experiment_id}"
        if not whole_experiment:
            page += f"/runs/{self.run_id}"
        return f"{page}?workflowType=machine_learning"

    def ui_command(self, whole_experiment: bool = False) -> str:
        """How to open this run (or its experiment) in the MLflow UI."""
        url = self.ui_url(whole_experiment=whole_experiment)
        if self.uri.startswith(("http://", "https://")):
            return f"open {url}"
        return f"mlflow ui --backend-store-uri {self.uri}  then open {url}"


def plot_history(history: list[dict[str, float]]):
    """A figure of global and personalised quality (accuracy / macro-F1, or BLEU / ROUGE-L)
    and train loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [h["round"] for h in history]
    for key, label in [
        ("global/accuracy", "global accuracy"),
        ("global/macro_f1", "global macro-F1"),
        ("personalized/accuracy_mean", "personalised accuracy (mean)"),
        ("personalized/macro_f1_mean", "personalised macro-F1 (mean)"),
        ("global/bleu", "global BLEU-4"),
        ("global/rouge_l", "global ROUGE-L"),
        ("personalized/bleu_mean", "personalised BLEU-4 (mean)"),
        ("personalized/rouge_l_mean", "personalised ROUGE-L (mean)"),
    ]:
        if not any(key in h for h in history):
            continue
        xs = [r for r, h in zip(rounds, history) if key in h]
        axes[0].plot(xs, [h[key] for h in history if key in h], marker="o", label=label)
    axes[0].set_xlabel("round")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    xs = [r for r, h in zip(rounds, history) if "train/loss_mean" in h]
    axes[1].plot(xs, [h["train/loss_mean"] for h in history if "train/loss_mean" in h], marker="o")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("train loss (mean over sampled clients)")
    axes[1].grid(alpha=0.3)
    for ax in axes:  # rounds are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
