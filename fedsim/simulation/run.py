"""A run from start-up to tear-down, and the public :func:`run` / :func:`resume` API.

:class:`Run` owns what a simulation holds outside its rounds: the executor (Ray or this
process), the pre-flight checks, the MLflow run (opened in a thread while the actors load),
the checkpoint writer, and the mapping of an error to the MLflow run's status and to the hint
that continues a stopped run. The rounds themselves are :class:`fedsim.simulation.rounds.RoundLoop`.
"""

from __future__ import annotations

import _thread
import functools
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray

from actors.executor import LocalExecutor, RayExecutor
from fedsim import termination
from fedsim.checkpoint.disk import (
    Checkpoint,
    CheckpointWriter,
    check_resume_config,
    is_resumable,
    load_checkpoint,
    relabel_run,
)
from fedsim.config import (
    ConfigError,
    FedSimConfig,
    as_config,
    load_config,
    resolve_ranks,
    to_yaml,
    tracking_uri,
)
from fedsim.config.arguments import check_flag, check_overrides, check_path
from fedsim.config.registry import build_merger, build_server_optimizer, enabled_methods
from fedsim.data.partition import clients_per_round
from fedsim.errors import RunFailed, one_line
from fedsim.simulation.preflight import check_ranks, preflight
from fedsim.simulation.rounds import Phases, RoundLoop
from fedsim.tracking.inputs import log_run_inputs
from fedsim.tracking.outputs import log_client_adapters, log_final_outputs
from fedsim.tracking.progress import RoundProgress
from fedsim.tracking.store import store_path
from fedsim.tracking.store_loss import untracked_summary
from fedsim.tracking.tracker import Tracker

_log = logging.getLogger(__name__)


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
            "merge_weight", "update_norm", "energy": {...}}`` (:mod:`aggregation.diagnostics`;
            ``energy``: the global adapter's energy per rank band, docs/algorithms.md §6.1;
            ``"leading": False`` where clients held other dimensions than their leading ones).
        run_dir: the run's checkpoint directory (``fedsim run --resume`` takes it).
        phases: seconds from the start of the run call to the end of each start-up and
            tear-down phase: ``ray`` (Ray up), ``store`` (MLflow run created, overlapping the
            actors' start), ``actors`` (every actor holds its backbone), ``ready`` (server
            built: round 0 starts), ``first_round`` (round 0 evaluated), ``rounds`` (last
            round logged), ``done`` (final outputs logged, run closed).
        phases_origin: the ``time.perf_counter()`` the phases count from (the run call).
        registered_model: ``NAME/VERSION`` of the registered model version the run's global
            adapter became (``tracking.register_model``), else None.
        untracked_since: the first round MLflow lacks because its store failed during the run
            (:mod:`fedsim.tracking.store_loss`); None when the store took everything.
        nodes: the Ray node ids that held the run's client actors, sorted (empty in process).
    """

    run_id: str
    tracking_uri: str
    history: list[dict[str, float]] = field(default_factory=list)
    merge: list[dict] = field(default_factory=list)
    clients: list[list[dict]] = field(default_factory=list)
    run_dir: Path | None = None
    phases: dict[str, float] = field(default_factory=dict)
    phases_origin: float = 0.0
    registered_model: str | None = None
    untracked_since: int | None = None
    nodes: list[str] = field(default_factory=list)

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
        "tracking.uri": store_path(tracking_uri(cfg.tracking.uri)),
    }
    return [key for key, path in outputs.items() if path and not Path(path).is_absolute()]


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
        sorted(set(resolve_ranks(cfg.clients, cfg.seed))),
    )


def run(
    config: FedSimConfig | dict | str | Path | None = None,
    *,
    dataset=None,
    executor: RayExecutor | LocalExecutor | None = None,
    quiet: bool = False,
) -> RunResult:
    """Run one federated simulation and log it to MLflow.

    Args:
        config: a :class:`FedSimConfig`, a dict of values over the defaults, a YAML path or
            the name of a shipped experiment (``"vlm_emoji"``), or None for the defaults.
        dataset: what :func:`fedsim.simulation.preflight.preflight` returned for this very
            config, when the caller ran it already (the CLI does, before importing Ray); None:
            run it here.
        executor: where the work runs: a :class:`actors.executor.RayExecutor` (None: the
            default) or a :class:`actors.executor.LocalExecutor` (everything in this process,
            no Ray; for debugging and the scale benchmark's floor). The numbers are the same.
        quiet: print nothing on stdout (no summary, run id or MLflow link) and draw no
            progress bar; warnings and errors still go to stderr. ``progress=false`` hides
            the bar only.

    Returns:
        The MLflow run id, the per-round metrics and the checkpoint directory.

    Raises:
        ConfigError: a config value is not allowed (including ranks the backbone cannot take),
            or an argument of the wrong type (named).
    """
    check_flag(quiet, "quiet")
    _check_executor(executor)
    return Run(as_config(config), None, dataset=dataset, executor=executor, quiet=quiet).execute()


def warm_pool() -> RayExecutor:
    """A pool of client actors that outlives a run: pass it as ``executor=`` to several
    :func:`run` calls (or ``pool=`` to :func:`fedsim.simulation.study.run_study`) and each
    run takes over the previous run's actor processes when it needs as many with the same
    resources, instead of starting new ones: their imports are paid once and, with
    ``resources.share_frozen``, the node's frozen backbone is mapped again rather than
    rebuilt. Everything a run owns (adapters, optimiser and method state, data splits, random
    streams) is new in each run, so the numbers are those of fresh actors.

    Use it as a context manager (leaving the block stops the actors, and Ray if the pool
    started it), or call ``shutdown()``::

        with fedsim.warm_pool() as pool:
            for method in ("fedilora", "zeropad"):
                fedsim.run({"aggregation": {"method": method}}, executor=pool)
    """
    return RayExecutor(keep_actors=True)


def _check_executor(executor) -> None:
    if executor is not None and not isinstance(executor, (RayExecutor, LocalExecutor)):
        raise ConfigError(
            "executor",
            f"expected a RayExecutor, a LocalExecutor or None, got {type(executor).__name__}",
        )


def resume(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    new_run: bool = False,
    executor: RayExecutor | LocalExecutor | None = None,
    quiet: bool = False,
) -> RunResult:
    """Continue a run from the latest checkpoint in ``run_dir`` (``fedsim run --resume``).

    The run continues under its own config (``run_dir/config.yaml``) and MLflow run, and
    reaches the same numbers as if it had never stopped. ``overrides`` may change ``rounds``
    (to extend a run), ``resources.*``, ``progress``, ``checkpoint.every``/``keep`` and the
    tracking store's URI, nothing that changes the numbers. The checkpoint is verified (see
    :mod:`fedsim.checkpoint.disk`) and ``config.yaml`` must still hold the run's values for every
    other key. ``quiet`` is :func:`run`'s.

    Args:
        new_run: continue into a new MLflow run (``--new-run``) instead of the checkpoint's own,
            for a run whose store was lost or whose MLflow run was deleted. Every round the
            checkpoint holds (metrics, client tables, merge diagnostics) is logged into the new
            run first; the run is tagged ``fedsim.resumed_from_run`` with the old run's id, and
            the checkpoint then names the new run (a later ``--resume`` continues it). With
            ``rounds`` at the checkpoint's round nothing is trained: the new run gets the
            history and the final adapter.

    Raises:
        ConfigError: no readable or valid checkpoint, an override that would change the
            numbers, a ``config.yaml`` edited since the run started, (without ``new_run``) a
            checkpoint whose MLflow run is not in the store, or an argument of the wrong type
            (named).
    """
    check_path(run_dir, "run_dir")
    overrides = check_overrides(overrides)
    check_flag(quiet, "quiet")
    _check_executor(executor)
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
    run_ = Run(cfg, ckpt, Path(run_dir), executor=executor, quiet=quiet, new_run=new_run)
    return run_.execute()


class Run:
    """One simulation: start-up, the rounds, the final outputs, tear-down.

    Start-up overlaps what it can: Ray and the client actors come up in the background (the
    actors import the model stack and load their backbones) while this process runs the
    pre-flight checks and opens the MLflow run in a thread. Every error ends the MLflow run
    with a status (:meth:`_stop`) and closes the executor.

    Args:
        cfg: the run's config (validated).
        ckpt: the checkpoint a resumed run continues from; None for a new run.
        run_dir: the resumed run's checkpoint directory.
        dataset: what :func:`~fedsim.simulation.preflight.preflight` returned for ``cfg``,
            when the caller ran it already; None: run it here.
        executor: a :class:`~actors.executor.RayExecutor` (None: the default) or a
            :class:`~actors.executor.LocalExecutor`.
        quiet: no summary, run id or link on stdout, and no progress bar.
        new_run: a resumed run continues into a new MLflow run (:func:`resume`).
    """

    def __init__(
        self,
        cfg: FedSimConfig,
        ckpt: Checkpoint | None,
        run_dir: Path | None = None,
        dataset=None,
        executor: RayExecutor | LocalExecutor | None = None,
        quiet: bool = False,
        new_run: bool = False,
    ):
        self.clock = Phases()
        self.quiet = quiet
        self.new_run = bool(ckpt) and new_run
        self.cfg, self.ckpt, self.run_dir, self.dataset = cfg, ckpt, run_dir, dataset
        self.ranks = list(ckpt.meta["ranks"]) if ckpt else resolve_ranks(cfg.clients, cfg.seed)
        self.per_round = clients_per_round(cfg.clients.num, cfg.clients.fraction)
        self.ex = executor or RayExecutor()
        self.opened = self.inputs = None  # the tracking thread's futures
        self._ray_up, self._ray_joined = threading.Event(), False
        self.pool = self.server = self.tracker = self.writer = self.progress = None

    def execute(self) -> RunResult:
        """Run the simulation to its last round and return what it produced."""
        self._check_inputs()
        self._open_tracking()
        self._start_ray()
        restore_sigint = None
        try:
            if threading.current_thread() is threading.main_thread():
                # Ray ends this process a minute after its GCS is lost: stop the run first
                restore_sigint = _sigint_for_interrupts()
                self.ex.on_gcs_lost(_interrupt_run)
            result, loop = self._start_actors()
            self._train(loop)
            self._finish(result, loop)
            self.ex.on_gcs_lost(None)
            return result
        except BaseException as exc:
            self.ex.on_gcs_lost(None)
            replacement = self._stop(exc)
            if replacement is not None:
                raise replacement from None
            raise
        finally:
            _RUN_INTERRUPT.clear()
            if restore_sigint is not None:
                restore_sigint()
            self.ex.close(self.pool, self.server)
            self.clock.mark("done")

    # -- start-up -------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        """Launch the executor, then check every output location, the dataset, the clients'
        splits and the model, once, before any work is handed out: a user mistake is a
        one-line config error."""
        cfg, ckpt = self.cfg, self.ckpt
        self.ex.launch(cfg, self.per_round)
        try:
            if self.dataset is None:
                run_id = ckpt.meta["mlflow_run_id"] if ckpt and not self.new_run else None
                resumed = (self.run_dir if ckpt else None, run_id)
                self.dataset = preflight(cfg, *resumed)
        except BaseException:
            self.ex.close(None, None)
            raise
        self.clock.mark("checks")

    def _open_tracking(self) -> None:
        """Open (or reopen) the MLflow run in a thread, once Ray is joined, while the actors
        load (the pre-flight checks created the store and its experiment already). A Ray that
        cannot be joined is a config error and leaves no run behind. A new run's data record
        is logged in the same thread once the run exists (the run waits for it before it
        finishes)."""
        cfg, ckpt, dataset = self.cfg, self.ckpt, self.dataset
        ray_up = self._ray_up = threading.Event()

        def once_ray_is_up(open_run):
            ray_up.wait()
            return open_run() if self._ray_joined else None

        tracking = ThreadPoolExecutor(1, thread_name_prefix="fedsim-tracking")
        if ckpt and not self.new_run:
            run_id = ckpt.meta["mlflow_run_id"]
            reopen = functools.partial(Tracker.reopen, cfg, run_id, ckpt.round)
            self.opened = tracking.submit(once_ray_is_up, reopen)
        else:
            if ckpt:  # --new-run
                create = functools.partial(_continued_run, cfg, ckpt)
            else:
                create = functools.partial(Tracker, cfg)
            self.opened = opened = tracking.submit(once_ray_is_up, create)
            self.inputs = tracking.submit(lambda: log_run_inputs(opened.result(), cfg, dataset))
        tracking.shutdown(wait=False)

    def _start_ray(self) -> None:
        try:
            self.ex.start()
        except BaseException:
            self._ray_joined = False
            self._ray_up.set()
            self.ex.close(None, None)
            raise
        self._ray_joined = True
        self._ray_up.set()
        termination.reclaim()  # Ray, starting in this process, replaced the SIGTERM handler
        self.clock.mark("ray")
        for key in ephemeral_paths(self.cfg):
            _log.warning(
                "%s is a relative path and this Ray job runs in Ray's temporary copy of the "
                "project; what it writes there is lost with the Ray session. Pass an absolute "
                "path (%s=/lasting/storage/...).",
                key,
                key,
            )

    def _start_actors(self) -> tuple[RunResult, RoundLoop]:
        """The client pool, the MLflow run, the server and the checkpoint writer; the round
        loop over them, restored from the checkpoint of a resumed run."""
        cfg, ckpt, ex, clock = self.cfg, self.ckpt, self.ex, self.clock
        try:
            self.pool = ex.make_pool(cfg, self.per_round, wait=False)
        finally:
            self.tracker = tracker = self.opened.result()  # the store's own error comes first
        tracker.start_system_metrics()
        clock.mark("store")
        self.pool.wait_ready()
        clock.mark("actors")
        nodes = ex.actor_nodes(self.pool)
        if tracker.system_metrics is not None:
            tracker.system_metrics.add_ray_nodes(nodes)
        self.info = info = self.pool.call_first("describe")
        check_ranks(resolve_ranks(cfg.clients, cfg.seed), info.max_rank)
        initial = self.pool.call_first("initial_global")
        self.server = ex.make_server(*server_args(cfg, initial))
        if ckpt:
            _load_server_state(ex, self.server, ckpt)
        else:
            self.run_dir = Path(cfg.checkpoint.dir) / tracker.run_id
        if not tracker.reopened:
            _log_skipped_rows(tracker, self.dataset)
        if cfg.checkpoint.every > 0:
            self.writer = _checkpoint_writer(cfg, ckpt, self.run_dir)
        run_dir = self.writer.run_dir if self.writer else None
        result = RunResult(tracker.run_id, tracker.uri, run_dir=run_dir, nodes=sorted(nodes))
        result.phases, result.phases_origin = clock.seconds, clock.start
        loop = RoundLoop(
            cfg,
            self.ranks,
            ex,
            self.pool,
            self.server,
            tracker,
            result,
            self.writer,
            info.client_train_sizes,
        )
        if ckpt:
            loop.restore(ckpt)  # logs the rounds the MLflow run lacks: all, for a new one
        if self.new_run and tracker.lost is None:  # later resumes continue the new run
            relabel_run(ckpt, tracker.run_id, tracker.uri)
        clock.mark("ready")
        return result, loop

    # -- the rounds and the end -----------------------------------------------------------
    def _train(self, loop: RoundLoop) -> None:
        cfg = self.cfg
        done = max(loop.next_round - 1, 0)  # rounds already trained (a resumed run's checkpoint)
        bar = cfg.progress and not self.quiet
        self.progress = RoundProgress(cfg.rounds, enabled=bar, initial=done)
        loop.run(self.progress, self.clock)
        self.progress.close()
        self.clock.mark("rounds")
        if cfg.rounds >= loop.first_round and not loop.merged_any:
            raise RunFailed(
                f"no round of this run merged a client update (rounds {loop.first_round}-"
                f"{cfg.rounds}: every sampled client failed, was late or was rejected); see the "
                "round lines above and the clients/ tables in MLflow"
            )

    def _finish(self, result: RunResult, loop: RoundLoop) -> None:
        """The final outputs (adapters, plots), then the MLflow run closes FINISHED. A run whose
        store failed skips the outputs (``--resume --new-run`` logs them) and says how to log
        its history into a new MLflow run."""
        cfg, tracker = self.cfg, self.tracker
        if self.inputs is not None:
            _wait_for_inputs(self.inputs)
        if tracker.lost is None:
            log_final_outputs(cfg, self.info, self.ex, self.pool, self.server, tracker, result)
        if cfg.tracking.save_client_adapters and tracker.lost is None:
            log_client_adapters(cfg, self.info, loop, tracker)
        tracker.finish()
        if not self.quiet:  # progress=false hides the bar only: the summary says where it went
            self.progress.summary(
                result.history, tracker.run_id, tracker.ui_command(), result.registered_model
            )
        if tracker.lost is not None:
            result.untracked_since = tracker.lost.round
            _log.warning(untracked_summary(tracker.lost, self.run_dir, self.writer is not None))

    def _stop(self, exc: BaseException) -> BaseException | None:
        """End the MLflow run after ``exc``: KILLED for an interrupt, FAILED otherwise, and
        no run at all for a user mistake found before round 0 of a new run (or of the new
        MLflow run of ``--new-run``). Points at the
        last good checkpoint; returns the error to raise instead of ``exc``, if any. A lost
        GCS (whatever error it caused, or the interrupt that reports it) is the run's error."""
        if self.progress is not None:  # end the bar's line before the error is printed
            self.progress.close()
        gcs = self.ex.take_gcs_loss()
        replaced = None
        if gcs is not None and not isinstance(exc, RunFailed):
            exc = replaced = RunFailed(f"{gcs}; the run cannot go on without it")
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        fresh = self.ckpt is None or self.new_run  # this process created the MLflow run
        if isinstance(exc, ConfigError) and fresh and self.progress is None:
            status = "DISCARD"
        hint = None
        writer = self.writer
        if writer is not None and (writer.run_dir / "latest.json").exists():
            hint = f"fedsim run --resume {writer.run_dir}"
            if self.tracker is not None and self.tracker.lost is not None:
                hint += " --new-run"  # the checkpoint's MLflow run misses rounds
            if isinstance(exc, RunFailed):  # the CLI prints it with the reason
                replaced = RunFailed(f"{exc}; the last good checkpoint continues with: {hint}")
            else:  # first: the one line a user needs, before the store's possibly slow update
                _log.warning("the run stopped; continue it with: %s", hint)
        if self.tracker is not None:
            _end_tracker(self.tracker, status)
        else:
            _close_tracker(self.opened, status)
        return replaced


# set just before the run interrupts its own main thread (a lost GCS), so that a SIGINT handler
# of ours tells that interrupt from a real SIGINT
_RUN_INTERRUPT = threading.Event()


def _interrupt_run(_reason: str) -> None:
    """Stop the run in the main thread (called from the GCS watcher's thread)."""
    _RUN_INTERRUPT.set()
    _thread.interrupt_main()


def _sigint_for_interrupts():
    """Make :func:`_interrupt_run` (and Ctrl-C) reach the main thread during a run without
    cutting a store call in the middle; returns the function that puts SIGINT's handler back,
    or None when nothing was changed.

    Under Python's own handler (a terminal's Ctrl-C) the run's handler raises
    ``KeyboardInterrupt`` as it would, but through :func:`fedsim.termination.interrupt`, which
    holds it until the MLflow call in progress ends. ``_thread.interrupt_main`` does nothing
    while SIGINT is ignored or left to the OS, as in a process a shell started in the
    background, ``nohup`` or a test runner's worker: the stop after a lost GCS would never
    come. There the handler takes the run's own interrupt and keeps the old behaviour for a
    real SIGINT (ignored, or the process ends as the OS would end it). A handler of someone
    else's is left alone.
    """
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if previous not in (signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler):
        return None

    def handler(signum, _frame):
        if _RUN_INTERRUPT.is_set() or previous is signal.default_int_handler:
            _RUN_INTERRUPT.clear()
            termination.interrupt(KeyboardInterrupt())
        elif previous == signal.SIG_DFL:  # a real SIGINT: what the OS would have done
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def _checkpoint_writer(cfg: FedSimConfig, ckpt: Checkpoint | None, run_dir: Path):
    """The checkpoint writer of the run, knowing a resumed run's client files and digests."""
    files = {int(c): f for c, f in (ckpt.meta["client_files"] if ckpt else {}).items()}
    saved = ckpt.meta["digests"] if ckpt else {}
    digests = {k.removeprefix("clients/"): v for k, v in saved.items()}
    writer = CheckpointWriter(
        run_dir, cfg.checkpoint.keep, files, config=cfg, client_digests=digests
    )
    writer.write_config(to_yaml(cfg))
    return writer


def _continued_run(cfg: FedSimConfig, ckpt: Checkpoint) -> Tracker:
    """A new MLflow run for a resumed run (``--new-run``), tagged with the run it continues."""
    tracker = Tracker(cfg)
    tracker.client.set_tag(tracker.run_id, "fedsim.resumed_from_run", ckpt.meta["mlflow_run_id"])
    tracker.client.set_tag(tracker.run_id, "fedsim.resumed_from_round", str(ckpt.round))
    return tracker


def _close_tracker(opened, status: str) -> None:
    """End the MLflow run the tracking thread opened (if it did) with ``status``."""
    try:
        tracker = opened.result()
    except Exception:
        return  # the store's own error; the run's error is the one to report
    if tracker is not None:  # None: Ray was never joined, so no run was opened
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
        _log.warning(
            "the run's data record (MLflow datasets, data/) was not logged: %s", one_line(exc)
        )


def _log_skipped_rows(tracker: Tracker, dataset) -> None:
    """``data/skipped_rows`` (a metric, 0 when none) and the table of rows left out."""
    skipped = list(getattr(dataset, "skipped", None) or [])
    tracker.log_metrics({"data/skipped_rows": len(skipped)}, step=0)
    if skipped:
        rows = [{"file": s.file, "row": s.row, "reason": s.reason} for s in skipped]
        tracker.log_table(rows, "data/skipped_rows.json")
