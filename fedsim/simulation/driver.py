"""The simulation driver: the one round loop, and the public :func:`run` API.

This is the wiring layer, the only module of ``fedsim`` that imports :mod:`actors`. Per round
it samples clients (seeded), hands every client task the object-store reference of the global
adapter, has the server actor validate and merge the updates in client-id order, evaluates the
new global adapter on the global test set and logs the round to MLflow.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray

from actors.executor import LocalExecutor, RayExecutor
from aggregation import InOrder
from aggregation.diagnostics import band_metrics
from fedsim.checkpoint.store import (
    Checkpoint,
    CheckpointWriter,
    check_resume_config,
    is_resumable,
    load_checkpoint,
)
from fedsim.config import (
    ConfigError,
    FedSimConfig,
    as_config,
    load_config,
    resolve_ranks,
    to_yaml,
)
from fedsim.config.registry import build_merger, build_server_optimizer, enabled_methods
from fedsim.data.partition import sample_clients
from fedsim.devices import assign_profiles, close_round, straggler_delay, task_seconds
from fedsim.errors import RunFailed
from fedsim.messages import (
    AggregateReport,
    ClientMeta,
    ClientState,
    ClientTask,
)
from fedsim.simulation.preflight import preflight
from fedsim.tasks.training import expected_samples
from fedsim.tracking.inputs import log_run_inputs
from fedsim.tracking.merge_report import merge_artifact
from fedsim.tracking.outputs import log_client_adapters, log_final_outputs
from fedsim.tracking.progress import RoundProgress
from fedsim.tracking.round_report import client_rows, global_metrics, round_metrics
from fedsim.tracking.store import store_path
from fedsim.tracking.tracker import Tracker


@dataclass
class RunResult:
    """What a simulation produced.

    Attributes:
        run_id: the MLflow run id.
        tracking_uri: the MLflow store it was logged to.
        history: one dict of metrics per round, round 0 (before training) first.
        clients: per round, one row per sampled client (report, status).
        merge: per round that merged (with ``tracking.merge_diagnostics``), the merge
            diagnostics per rank dimension: ``{"round": t, "coverage": [...], "weight",
            "merge_weight", "update_norm"}`` (:mod:`aggregation.diagnostics`).
        run_dir: the run's checkpoint directory (``fedsim run --resume`` takes it).
        phases: seconds from the start of the run call to the end of each start-up and
            tear-down phase: ``ray`` (Ray up), ``store`` (MLflow run created, overlapping the
            actors' start), ``actors`` (every actor holds its backbone), ``ready`` (server
            built: round 0 starts), ``first_round`` (round 0 evaluated), ``rounds`` (last
            round logged), ``done`` (final outputs logged, run closed).
        phases_origin: the ``time.perf_counter()`` the phases count from (the run call).
    """

    run_id: str
    tracking_uri: str
    history: list[dict[str, float]] = field(default_factory=list)
    merge: list[dict] = field(default_factory=list)
    clients: list[list[dict]] = field(default_factory=list)
    run_dir: Path | None = None
    phases: dict[str, float] = field(default_factory=dict)
    phases_origin: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        """Metrics of the last round."""
        return self.history[-1]


def ephemeral_paths(cfg: FedSimConfig, environ=os.environ) -> list[str]:
    """Config keys whose relative paths would land in a Ray job's temporary working_dir.

    Under ``ray job submit`` with a ``working_dir`` the driver runs inside Ray's unpacked copy
    of the project, which goes away with the Ray session.
    """
    try:
        job = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except json.JSONDecodeError:
        return []
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return []
    outputs = {
        "checkpoint.dir": cfg.checkpoint.dir if cfg.checkpoint.every > 0 else None,
        "tracking.uri": store_path(cfg.tracking.uri),
    }
    return [key for key, path in outputs.items() if path and not Path(path).is_absolute()]


def _check_ranks(ranks: list[int], max_rank: int) -> None:
    for cid, r in enumerate(ranks):
        if r > max_rank:
            raise ConfigError(
                "clients.ranks",
                f"client {cid} has rank {r} but the backbone's LoRA target modules admit at "
                f"most rank {max_rank}",
            )


def server_args(cfg: FedSimConfig, initial: dict) -> tuple:
    """The arguments of :class:`actors.server.ServerState` for ``cfg``'s run.

    Args:
        cfg: the run's config.
        initial: the initial global adapter (``ClientWorker.initial_global``).
    """
    return (
        build_merger(cfg),
        initial,
        build_server_optimizer(cfg.server),
        enabled_methods(cfg),
        cfg.clients.num,
        cfg.aggregation.streaming,
        cfg.tracking.merge_diagnostics,
    )


def run(
    config: FedSimConfig | dict | str | Path | None = None,
    *,
    dataset=None,
    executor: RayExecutor | LocalExecutor | None = None,
) -> RunResult:
    """Run one federated simulation and log it to MLflow.

    Args:
        config: a :class:`FedSimConfig`, a dict of values over the defaults, a YAML path, or
            None for the defaults.
        dataset: what :func:`fedsim.simulation.preflight.preflight` returned for this very
            config, when the caller ran it already (the CLI does, before importing Ray); None:
            run it here.
        executor: where the work runs: a :class:`actors.executor.RayExecutor` (None: the
            default) or a :class:`actors.executor.LocalExecutor` (everything in this process,
            no Ray; for debugging and the scale benchmark's floor). The numbers are the same.

    Returns:
        The MLflow run id, the per-round metrics and the checkpoint directory.

    Raises:
        ConfigError: a config value is not allowed (including ranks the backbone cannot take).
    """
    return _simulate(as_config(config), None, dataset=dataset, executor=executor)


def resume(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    executor: RayExecutor | LocalExecutor | None = None,
) -> RunResult:
    """Continue a run from the latest checkpoint in ``run_dir`` (``fedsim run --resume``).

    The run continues under its own config (``run_dir/config.yaml``) and MLflow run, and
    reaches the same numbers as if it had never stopped. ``overrides`` may change ``rounds``
    (to extend a run), ``resources.*``, ``progress``, ``checkpoint.every``/``keep`` and the
    tracking store's URI, nothing that changes the numbers. The checkpoint is verified (see
    :mod:`fedsim.checkpoint.store`) and ``config.yaml`` must still hold the run's values for every
    other key.

    Raises:
        ConfigError: no readable or valid checkpoint, an override that would change the
            numbers, or a ``config.yaml`` edited since the run started.
    """
    ckpt = load_checkpoint(run_dir)
    for item in overrides:
        key = item.partition("=")[0]
        if not is_resumable(key):
            raise ConfigError(
                key,
                "cannot change when resuming (it would change the run's numbers or identity); "
                "a resumed run may override rounds, progress, resources.*, checkpoint.every, "
                "checkpoint.keep, tracking.uri, tracking.save_adapter and tracking.plots",
            )
    cfg = load_config(Path(run_dir) / "config.yaml", overrides)
    check_resume_config(ckpt, cfg)
    if cfg.rounds < ckpt.round:
        raise ConfigError(
            "rounds", f"the checkpoint is at round {ckpt.round}; rounds={cfg.rounds} is behind it"
        )
    return _simulate(cfg, ckpt, Path(run_dir), executor=executor)


@dataclass
class _Totals:
    """Counters that run across rounds (and across a resume)."""

    upload_bytes: int = 0
    download_bytes: int = 0
    simulated_s: float = 0.0


def _simulate(
    cfg: FedSimConfig,
    ckpt: Checkpoint | None,
    run_dir: Path | None = None,
    dataset=None,
    executor: RayExecutor | LocalExecutor | None = None,
):
    clock = _Phases()
    ranks = list(ckpt.meta["ranks"]) if ckpt else resolve_ranks(cfg.clients, cfg.seed)
    per_round = len(sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, 1))
    ex = executor or RayExecutor()
    # Ray and the client actors come up in the background (the actors import the model stack
    # and load their backbones) while this process checks the inputs and opens the store.
    ex.launch(cfg, per_round)
    # Every output location, the dataset, the clients' splits and the model are checked here,
    # once, before any work is handed out: a user mistake is a one-line config error.
    try:
        if dataset is None:
            resumed = (run_dir, ckpt.meta["mlflow_run_id"]) if ckpt else (None, None)
            dataset = preflight(cfg, *resumed)
    except BaseException:
        ex.close(None, None)
        raise
    clock.mark("checks")
    # The MLflow store (schema migrations take seconds on a fresh SQLite file) is set up in a
    # thread while the actors load.
    tracking = ThreadPoolExecutor(1, thread_name_prefix="fedsim-tracking")
    inputs = None
    if ckpt:
        opened = tracking.submit(Tracker.reopen, cfg, ckpt.meta["mlflow_run_id"], ckpt.round)
    else:
        opened = tracking.submit(Tracker, cfg)
        # the datasets, client table and heat map: logged in the same thread once the run
        # exists, while the rounds start (the run waits for them before it finishes)
        inputs = tracking.submit(lambda: log_run_inputs(opened.result(), cfg, dataset))
    tracking.shutdown(wait=False)
    try:
        ex.start()
    except BaseException:
        _close_tracker(opened, "FAILED")
        ex.close(None, None)
        raise
    clock.mark("ray")
    for key in ephemeral_paths(cfg):
        print(
            f"fedsim: warning: {key} is a relative path and this Ray job runs in Ray's temporary "
            "copy of the project; what it writes there is lost with the Ray session. "
            f"Pass an absolute path ({key}=/lasting/storage/...).",
            file=sys.stderr,
        )
    pool = server = tracker = writer = progress = None
    try:
        try:
            pool = ex.make_pool(cfg, per_round, wait=False)
        finally:
            tracker = opened.result()  # the store's own error, if any, comes first
        tracker.start_system_metrics()
        clock.mark("store")
        pool.wait_ready()
        clock.mark("actors")
        if tracker.system_metrics is not None:
            tracker.system_metrics.add_ray_nodes(ex.actor_nodes(pool))
        info = pool.call_first("describe")
        _check_ranks(resolve_ranks(cfg.clients, cfg.seed), info.max_rank)
        initial = pool.call_first("initial_global")
        server = ex.make_server(*server_args(cfg, initial))
        if ckpt:
            _load_server_state(ex, server, ckpt)
        else:
            run_dir = Path(cfg.checkpoint.dir) / tracker.run_id
            _log_skipped_rows(tracker, dataset)
        if cfg.checkpoint.every > 0:
            files = {int(c): f for c, f in (ckpt.meta["client_files"] if ckpt else {}).items()}
            saved = ckpt.meta["digests"] if ckpt else {}
            digests = {k.removeprefix("clients/"): v for k, v in saved.items()}
            writer = CheckpointWriter(
                run_dir, cfg.checkpoint.keep, files, config=cfg, client_digests=digests
            )
            writer.write_config(to_yaml(cfg))
        result = RunResult(tracker.run_id, tracker.uri, run_dir=writer.run_dir if writer else None)
        result.phases, result.phases_origin = clock.seconds, clock.start
        driver = _Driver(
            cfg, ranks, ex, pool, server, tracker, result, writer, info.client_train_sizes
        )
        if ckpt:
            driver.restore(ckpt)
        clock.mark("ready")
        done = max(driver.next_round - 1, 0)  # rounds already trained (a resumed run's checkpoint)
        progress = RoundProgress(cfg.rounds, enabled=cfg.progress, initial=done)
        driver.loop(progress, clock)
        progress.close()
        clock.mark("rounds")
        if cfg.rounds >= driver.first_round and not driver.merged_any:
            raise RunFailed(
                f"no round of this run merged a client update (rounds {driver.first_round}-"
                f"{cfg.rounds}: every sampled client failed, was late or was rejected); see the "
                "round lines above and the clients/ tables in MLflow"
            )
        if inputs is not None:
            _wait_for_inputs(inputs)
        log_final_outputs(cfg, info, ex, pool, server, tracker, result)
        if cfg.tracking.save_client_adapters:
            log_client_adapters(cfg, info, driver, tracker)
        tracker.finish()
        if cfg.progress:
            progress.summary(result.history, tracker.run_id, tracker.ui_command())
        return result
    except BaseException as exc:
        if progress is not None:  # end the bar's line before the error is printed
            progress.close()
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        # a user mistake found before round 0 of a new run leaves no run behind
        if isinstance(exc, ConfigError) and ckpt is None and progress is None:
            status = "DISCARD"
        if tracker is not None:
            _end_tracker(tracker, status)
        else:
            _close_tracker(opened, status)
        if writer is not None and (writer.run_dir / "latest.json").exists():
            hint = f"fedsim run --resume {writer.run_dir}"
            if isinstance(exc, RunFailed):  # the CLI prints it with the reason
                raise RunFailed(f"{exc}; the last good checkpoint continues with: {hint}") from None
            print(f"fedsim: the run stopped; continue it with: {hint}", file=sys.stderr, flush=True)
        raise
    finally:
        ex.close(pool, server)
        clock.mark("done")


class _Phases:
    """Seconds from the run call's start to the end of each start-up and tear-down phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.seconds[phase] = time.perf_counter() - self.start


def _close_tracker(opened, status: str) -> None:
    """End the MLflow run the tracking thread opened (if it did) with ``status``."""
    try:
        tracker = opened.result()
    except Exception:
        return  # the store's own error; the run's error is the one to report
    _end_tracker(tracker, status)


def _end_tracker(tracker: Tracker, status: str) -> None:
    """Mark the run ``status``; ``DISCARD``: delete a run a config error stopped at once."""
    if status == "DISCARD" and not tracker.reopened:
        tracker.discard()
    else:
        tracker.finish("FAILED" if status == "DISCARD" else status)


def _load_server_state(ex, server, ckpt: Checkpoint) -> None:
    """Load a checkpoint's server state; one that does not fit this run is a config error."""
    try:
        ex.get(ex.call(server, "load_state_dict", ckpt.server))
    except (ray.exceptions.RayTaskError, ValueError, KeyError) as exc:
        reason = str(exc.cause) if getattr(exc, "cause", None) else str(exc).splitlines()[-1]
        raise ConfigError(
            "--resume", f"{ckpt.path / 'server.safetensors'} does not fit this run: {reason}"
        ) from None


def _wait_for_inputs(inputs) -> None:
    """Wait for the run's data record; one that could not be logged is a warning, not a failed
    run (the metrics, checkpoints and adapters are all there)."""
    try:
        inputs.result()
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(
            f"fedsim: warning: the run's data record (MLflow datasets, data/) was not logged: "
            f"{reason}",
            file=sys.stderr,
            flush=True,
        )


def _log_skipped_rows(tracker: Tracker, dataset) -> None:
    """``data/skipped_rows`` (a metric, 0 when none) and the table of rows left out."""
    skipped = list(getattr(dataset, "skipped", None) or [])
    tracker.log_metrics({"data/skipped_rows": len(skipped)}, step=0)
    if skipped:
        rows = [{"file": s.file, "row": s.row, "reason": s.reason} for s in skipped]
        tracker.log_table(rows, "data/skipped_rows.json")


class _RoundStream:
    """One round's streaming merge: updates go to the server as the clients finish, in
    client-id order (:class:`aggregation.InOrder` holds an early arrival until every smaller
    sampled id has reported or failed for good)."""

    def __init__(self, driver: _Driver, round_idx: int, sampled: list[int]):
        self.ex, self.server = driver.ex, driver.server
        self.order = InOrder(sampled)
        self.calls = [self.ex.call(self.server, "stream_open", round_idx)]

    def on_done(self, cid: int, report, refs) -> None:
        ready = self.order.drop(cid) if report is None else self.order.offer(cid, (report, refs))
        for c, (r, refs) in ready:
            meta = ClientMeta(c, r.rank, r.num_samples, r.steps)
            self.calls.append(self.ex.call(self.server, "stream_add", meta, refs.upload))

    def close(self, apply: bool) -> AggregateReport:
        if self.order.pending:
            raise RuntimeError(f"{self.order.pending} update(s) never released to the merge")
        self.ex.get(self.calls)  # a server error surfaces here
        return self.ex.get(self.ex.call(self.server, "stream_close", apply))


class _Driver:
    """The round loop and the state the driver keeps across rounds."""

    def __init__(
        self, cfg, ranks, ex, pool, server, tracker, result: RunResult, writer, train_sizes
    ):
        self.cfg = cfg
        t = cfg.train  # each client's expected training work: the longest tasks go out first
        self.cost = [
            expected_samples(n, t.batch_size, t.local_epochs, t.max_local_steps)
            for n in train_sizes
        ]
        self.ranks = list(ranks)  # current ranks: self-pruning may lower them
        # the band edges of the merge diagnostics' metrics: the federation's configured ranks
        self.rank_levels = sorted(set(resolve_ranks(cfg.clients, cfg.seed)))
        self.ex = ex  # the executor: Ray's get/put and server calls, or in-process ones
        self.pool, self.server, self.tracker = pool, server, tracker
        self.result = result
        self.writer = writer
        self.states: dict[int, object] = {}  # client id -> object ref of its ClientState
        self.methods = enabled_methods(cfg)  # for their round-loop hooks (metrics, columns)
        self.profiles = assign_profiles(cfg)
        self.totals = _Totals()
        self.next_round = 0
        self.first_round = 1  # the first round this process trains (later when resumed)
        self._dirty: set[int] = set()  # clients whose state changed since the last checkpoint
        # client id -> (ref of its last upload, its rank): tracking.save_client_adapters
        self.last_upload: dict[int, tuple[object, int]] = {}
        self.empty_rounds: list[int] = []  # the current streak of rounds that merged nothing
        self.merged_any = False  # whether any round of this process merged an update
        self.streaming = bool(ex.get(ex.call(server, "streams")))
        self._shared = None  # the object-store ref of the current broadcast, once made

    def _broadcast(self):
        """The current global adapter's broadcast as one shared object (made once per change:
        a round's evaluation and the next round's tasks read the same one)."""
        if self._shared is None:
            self._shared = self.ex.share(self.ex.call(self.server, "broadcast"))
        return self._shared

    def restore(self, ckpt: Checkpoint) -> None:
        """Take up the driver's state from a checkpoint, and log what MLflow missed."""
        meta = ckpt.meta
        self.states = {c: self.ex.put(ClientState.from_dict(s)) for c, s in ckpt.clients.items()}
        self.totals = _Totals(**meta["totals"])
        self.result.history = meta["history"]
        self.result.clients = meta["clients"]
        self.result.merge = meta.get("merge", [])
        self.next_round = ckpt.round + 1
        self.first_round = self.next_round
        # The checkpoint is written before a round is logged: log any round the kill cut off.
        logged = self.tracker.last_step("time/round_s")  # logged every round (eval.every)
        dims = {d["round"]: d for d in self.result.merge}
        for h, rows in zip(self.result.history, self.result.clients):
            if h["round"] > logged:
                metrics = {k: v for k, v in h.items() if k != "round"}
                self._log(h["round"], metrics, rows, dims.get(h["round"]))

    def loop(self, progress, clock: _Phases | None = None) -> None:
        """Round 0 evaluates the initial adapter; rounds 1..T train."""
        if self.next_round == 0:
            start = time.perf_counter()
            metrics = self._evaluate_global(0)
            metrics["time/round_s"] = time.perf_counter() - start
            if clock is not None:
                metrics["time/startup_s"] = clock.seconds.get("ready", 0.0)
            self._end_round(0, metrics, [], [])
            progress.update(0, metrics)
        if clock is not None:
            clock.mark("first_round")
        for t in range(max(self.next_round, 1), self.cfg.rounds + 1):
            metrics = self._round(t)
            progress.update(t, metrics)

    def evaluates(self, t: int) -> bool:
        """Whether round ``t`` is evaluated: every ``eval.every`` rounds, round 0 and the last."""
        return t % self.cfg.eval.every == 0 or t == self.cfg.rounds

    def _evaluate_global(self, t: int) -> dict[str, float]:
        """Evaluate the global adapter; log round ``t``'s example generations, if any."""
        metrics, examples = global_metrics(self.pool.evaluate(self._broadcast()))
        if examples:
            self.tracker.log_table(examples, f"examples/round_{t:04d}.json")
        return metrics

    def _round(self, t: int) -> dict[str, float]:
        cfg = self.cfg
        start = time.perf_counter()
        sampled = sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, t)
        broadcast = self._broadcast()  # one object for all tasks
        evaluate = self.evaluates(t)
        cohort = tuple(self.ranks[c] for c in sampled)
        # longest expected first (ties by id): results are keyed and merged by client id, so
        # the order changes when actors are free, never a number
        order = sorted(sampled, key=lambda c: (-self.cost[c], c))
        tasks = [ClientTask(c, self.ranks[c], t, evaluate=evaluate, cohort=cohort) for c in order]
        # Without a deadline every reporting client is merged, so a linear merge can take
        # each update as it arrives (in client-id order: the same bits in any arrival order).
        streams = self.streaming and cfg.round.deadline_s <= 0
        stream = _RoundStream(self, t, sampled) if streams else None
        outcome = self.pool.train(tasks, broadcast, self.states, stream and stream.on_done)
        train_s = time.perf_counter() - start
        finished = {c: outcome.values[c] for c in sorted(outcome.values)}
        sim_s = {
            c: task_seconds(
                self.profiles[c][1],
                cfg.devices.step_s,
                r.steps,
                r.upload_bytes,
                r.download_bytes,
                straggler_delay(cfg, t, c),
            )
            for c, r in finished.items()
        }
        close = close_round(sim_s, cfg.round.deadline_s, cfg.round.min_clients)
        status = {c: f"failed: {reason}" for c, reason in outcome.failed.items()}
        status.update({c: "late" for c in close.late})
        used = close.on_time
        if len(used) < cfg.round.min_clients:
            print(
                f"round {t}: only {len(used)} client(s) reported, fewer than "
                f"round.min_clients={cfg.round.min_clients}; the round merges nothing",
                flush=True,
            )
            status.update({c: "unused: too few clients reported" for c in used})
            used = []
        reports = [finished[c] for c in used]
        for c in used:
            self.states[c] = outcome.refs[c].state
            if cfg.tracking.save_client_adapters:  # its last personalised adapter, at the end
                self.last_upload[c] = (outcome.refs[c].upload, finished[c].rank)
        meta = [ClientMeta(c, r.rank, r.num_samples, r.steps) for c, r in zip(used, reports)]
        for c, r in zip(used, reports):  # a method may lower the rank (HetLoRA's pruning)
            self.ranks[c] = r.next_rank or self.ranks[c]
        if stream is not None:
            agg = stream.close(apply=bool(used))
        elif used:
            uploads = [outcome.refs[c].upload for c in used]
            agg = self.ex.get(self.ex.call(self.server, "aggregate_packed", t, meta, *uploads))
        else:
            agg = AggregateReport(t)
        self._shared = None  # the global adapter may have changed
        for cid, reason in agg.rejected.items():
            print(f"round {t}: update of client {cid} rejected: {reason}", flush=True)
            status[cid] = f"rejected: {reason}"
        if agg.nonfinite:
            raise RunFailed(
                f"round {t}: the merged global adapter is not finite (NaN/Inf in "
                f"{', '.join(agg.nonfinite[:3])}{' ...' if len(agg.nonfinite) > 3 else ''}); "
                "the round was not applied. Lower server.lr or train.lr"
            )
        merged = any(c not in agg.rejected for c in used)
        reasons = [*outcome.failed.values(), *agg.rejected.values()]
        self._count_empty(t, sampled, status, merged, reasons)
        metrics = round_metrics(
            self.methods, reports, list(finished.values()), agg.rejected, outcome.failed, close.late
        )
        metrics.update(agg.metrics)
        dims = None
        if agg.diagnostics is not None:
            dims = {"round": t, **agg.diagnostics}
            metrics.update(band_metrics(agg.diagnostics, self.rank_levels))
            shares = [c["share"] for c in agg.columns.values() if "share" in c]
            metrics["merge/max_share"] = max(shares, default=0.0)
        metrics["clients/rank_mean"] = float(np.mean(self.ranks))
        metrics["clients/actors_replaced"] = self.pool.replaced
        metrics["time/train_s"] = train_s
        if evaluate:
            eval_start = time.perf_counter()
            metrics.update(self._evaluate_global(t))
            metrics["time/eval_s"] = time.perf_counter() - eval_start
        self.totals.upload_bytes += metrics["comm/upload_bytes"]
        self.totals.download_bytes += metrics["comm/download_bytes"]
        self.totals.simulated_s += close.seconds
        metrics["comm/upload_bytes_total"] = self.totals.upload_bytes
        metrics["comm/download_bytes_total"] = self.totals.download_bytes
        metrics["time/simulated_round_s"] = close.seconds
        metrics["time/simulated_total_s"] = self.totals.simulated_s
        metrics["time/aggregate_s"] = agg.aggregate_s
        metrics["time/round_s"] = time.perf_counter() - start
        rows = client_rows(
            self.methods, list(finished.values()), status, sim_s, self.profiles, agg.columns
        )
        self._end_round(t, metrics, rows, used, dims)
        return metrics

    def _count_empty(self, t: int, sampled: list, status: dict, merged: bool, reasons) -> None:
        """Say so when round ``t`` merged nothing; stop after ``round.max_empty_rounds``."""
        if merged:
            self.empty_rounds = []
            self.merged_any = True
            return
        self.empty_rounds.append(t)
        kinds = [s.split(":")[0] for s in status.values()]
        counts = {k: kinds.count(k) for k in ("failed", "late", "rejected", "unused")}
        why = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "none reported"
        print(
            f"round {t}: nothing merged ({len(sampled)} sampled: {why}); the global adapter "
            "is unchanged",
            file=sys.stderr,
            flush=True,
        )
        limit = self.cfg.round.max_empty_rounds
        if limit and len(self.empty_rounds) >= limit:
            reasons = sorted(set(reasons))
            detail = f"; e.g. {reasons[0][:200]}" if reasons else ""
            raise RunFailed(
                f"rounds {self.empty_rounds[0]}-{t} merged no client update (round {t}: "
                f"{why}{detail}); stopped by round.max_empty_rounds={limit}"
            )

    def _end_round(
        self, t: int, metrics: dict, rows: list[dict], used: list[int], dims: dict | None = None
    ) -> None:
        """Record round ``t``: history, checkpoint (first), then MLflow."""
        self.result.history.append({"round": t, **metrics})
        self.result.clients.append(rows)
        if dims is not None:
            self.result.merge.append(dims)
        self._dirty.update(used)
        every = self.cfg.checkpoint.every
        if self.writer is not None and (t % every == 0 or t == self.cfg.rounds):
            self._checkpoint(t)
        self._log(t, metrics, rows, dims)

    def _checkpoint(self, t: int) -> None:
        # Only the clients trained since the last checkpoint changed: a round's checkpoint
        # costs what it sampled, whatever the number of clients. The writer keeps the rest.
        dirty = sorted(self._dirty)
        states = self.ex.get([self.states[c] for c in dirty])
        changed = {c: s.to_dict() for c, s in zip(dirty, states)}
        server = self.ex.get(self.ex.call(self.server, "state_dict"))
        meta = {
            "ranks": self.ranks,
            "history": self.result.history,
            "clients": self.result.clients,
            "merge": self.result.merge,
            "totals": asdict(self.totals),
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri,
            # All randomness is counter-based: SeedSequence(seed, stream, round, client), so
            # the seed and the next round are the whole RNG state.
            "rng": {"seed": self.cfg.seed, "next_round": t + 1},
        }
        self.writer.save(t, server, changed, meta)
        self._dirty.clear()

    def _log(self, t: int, metrics: dict, rows: list[dict], dims: dict | None = None) -> None:
        self.tracker.log_metrics(metrics, step=t)
        if rows:
            self.tracker.log_table(rows, f"clients/round_{t:04d}.json")
        if dims is not None:
            self.tracker.log_text(json.dumps(dims), merge_artifact(t))
