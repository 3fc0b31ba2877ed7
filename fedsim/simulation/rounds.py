"""The round loop: the one place rounds are run, whatever the executor.

Per round :class:`RoundLoop` samples clients (seeded), hands every client task the
object-store reference of the global adapter, closes the round (deadline, stragglers,
failures), has the server validate and merge the updates in client-id order, evaluates the new
global adapter, and records the round: history, checkpoint, then MLflow. What a round logs is
built in :mod:`fedsim.tracking.round_report`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from aggregation import InOrder
from fedsim.checkpoint.disk import Checkpoint
from fedsim.config import resolve_ranks
from fedsim.config.registry import enabled_methods
from fedsim.data.partition import sample_clients
from fedsim.devices import assign_profiles, close_round, straggler_delay, task_seconds
from fedsim.errors import RunFailed
from fedsim.messages import AggregateReport, ClientMeta, ClientState, ClientTask
from fedsim.tasks.training import expected_samples
from fedsim.tracking.merge_report import merge_artifact
from fedsim.tracking.round_report import (
    client_rows,
    global_metrics,
    merge_metrics,
    round_metrics,
    totals_metrics,
)

if TYPE_CHECKING:
    from fedsim.simulation.run import RunResult


_log = logging.getLogger(__name__)


@dataclass
class Totals:
    """Counters that run across rounds (and across a resume)."""

    upload_bytes: int = 0
    download_bytes: int = 0
    simulated_s: float = 0.0


class Phases:
    """Seconds from the run call's start to the end of each start-up and tear-down phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.seconds[phase] = time.perf_counter() - self.start


class _RoundStream:
    """One round's streaming merge: updates go to the server as the clients finish, in
    client-id order (:class:`aggregation.InOrder` holds an early arrival until every smaller
    sampled id has reported or failed for good)."""

    def __init__(self, driver: RoundLoop, round_idx: int, sampled: list[int]):
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


class RoundLoop:
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
        self.totals = Totals()
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
        self.totals = Totals(**meta["totals"])
        self.result.history = meta["history"]
        self.result.clients = meta["clients"]
        self.result.merge = meta["merge"]
        self.next_round = ckpt.round + 1
        self.first_round = self.next_round
        # The checkpoint is written before a round is logged: log any round the kill cut off.
        logged = self.tracker.logged  # the last round the run's MLflow run holds
        dims = {d["round"]: d for d in self.result.merge}
        for h, rows in zip(self.result.history, self.result.clients):
            if h["round"] > logged:
                metrics = {k: v for k, v in h.items() if k != "round"}
                self._log(h["round"], metrics, rows, dims.get(h["round"]))

    def run(self, progress, clock: Phases | None = None) -> None:
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
        """Train, close, merge, evaluate and record round ``t``; its metrics."""
        start = time.perf_counter()
        work = self._train(t)
        train_s = time.perf_counter() - start
        closed = self._close(t, work)
        agg = self._merge(t, work, closed)
        merged = any(c not in agg.rejected for c in closed.used)
        reasons = [*work.outcome.failed.values(), *agg.rejected.values()]
        self._count_empty(t, work.sampled, closed.status, merged, reasons)
        finished = list(work.finished.values())
        metrics = round_metrics(
            self.methods,
            closed.reports,
            finished,
            agg.rejected,
            work.outcome.failed,
            closed.timing.late,
        )
        metrics.update(merge_metrics(agg, self.rank_levels))
        metrics["clients/rank_mean"] = float(np.mean(self.ranks))
        metrics["clients/actors_replaced"] = self.pool.replaced
        metrics["time/train_s"] = train_s
        if work.evaluate:
            eval_start = time.perf_counter()
            metrics.update(self._evaluate_global(t))
            metrics["time/eval_s"] = time.perf_counter() - eval_start
        metrics.update(totals_metrics(self.totals, metrics, closed.timing.seconds, agg.aggregate_s))
        metrics["time/round_s"] = time.perf_counter() - start
        rows = client_rows(
            self.methods, finished, closed.status, closed.sim_s, self.profiles, agg.columns
        )
        dims = {"round": t, **agg.diagnostics} if agg.diagnostics is not None else None
        self._end_round(t, metrics, rows, closed.used, dims)
        return metrics

    def _train(self, t: int) -> _Work:
        """Hand round ``t``'s tasks out and collect what comes back."""
        cfg = self.cfg
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
        finished = {c: outcome.values[c] for c in sorted(outcome.values)}
        return _Work(sampled, evaluate, stream, outcome, finished)

    def _close(self, t: int, work: _Work) -> _Closed:
        """Which finished clients the round merges: the simulated clock's deadline leaves the
        late ones out, ``round.min_clients`` all of them when too few report. Takes up the
        merged clients' new states and ranks."""
        cfg = self.cfg
        sim_s = {
            c: task_seconds(
                self.profiles[c][1],
                cfg.devices.step_s,
                r.steps,
                r.upload_bytes,
                r.download_bytes,
                straggler_delay(cfg, t, c),
            )
            for c, r in work.finished.items()
        }
        timing = close_round(sim_s, cfg.round.deadline_s, cfg.round.min_clients)
        status = {c: f"failed: {reason}" for c, reason in work.outcome.failed.items()}
        status.update({c: "late" for c in timing.late})
        used = timing.on_time
        if len(used) < cfg.round.min_clients:
            _log.warning(
                "round %d: only %d client(s) reported, fewer than round.min_clients=%d; the "
                "round merges nothing",
                t,
                len(used),
                cfg.round.min_clients,
            )
            status.update({c: "unused: too few clients reported" for c in used})
            used = []
        reports = [work.finished[c] for c in used]
        for c in used:
            self.states[c] = work.outcome.refs[c].state
            if cfg.tracking.save_client_adapters:  # its last personalised adapter, at the end
                self.last_upload[c] = (work.outcome.refs[c].upload, work.finished[c].rank)
        for c, r in zip(used, reports):  # a method may lower the rank (HetLoRA's pruning)
            self.ranks[c] = r.next_rank or self.ranks[c]
        return _Closed(used, reports, status, sim_s, timing)

    def _merge(self, t: int, work: _Work, closed: _Closed) -> AggregateReport:
        """The server's merge of the used updates (streamed, or as one batch); rejected
        updates are reported, a non-finite global adapter stops the run."""
        used, reports = closed.used, closed.reports
        if work.stream is not None:
            agg = work.stream.close(apply=bool(used))
        elif used:
            meta = [ClientMeta(c, r.rank, r.num_samples, r.steps) for c, r in zip(used, reports)]
            uploads = [work.outcome.refs[c].upload for c in used]
            agg = self.ex.get(self.ex.call(self.server, "aggregate_packed", t, meta, *uploads))
        else:
            agg = AggregateReport(t)
        self._shared = None  # the global adapter may have changed
        for cid, reason in agg.rejected.items():
            _log.warning("round %d: update of client %d rejected: %s", t, cid, reason)
            closed.status[cid] = f"rejected: {reason}"
        if agg.nonfinite:
            raise RunFailed(
                f"round {t}: the merged global adapter is not finite (NaN/Inf in "
                f"{', '.join(agg.nonfinite[:3])}{' ...' if len(agg.nonfinite) > 3 else ''}); "
                "the round was not applied. Lower server.lr or train.lr"
            )
        return agg

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
        _log.warning(
            "round %d: nothing merged (%d sampled: %s); the global adapter is unchanged",
            t,
            len(sampled),
            why,
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


@dataclass
class _Work:
    """What round's tasks came back with."""

    sampled: list[int]
    evaluate: bool
    stream: _RoundStream | None
    outcome: object  # the pool's TrainOutcome: values, refs and failures by client id
    finished: dict  # client id -> ClientReport, in id order


@dataclass
class _Closed:
    """How a round closed: the clients it merges and every client's status."""

    used: list[int]
    reports: list  # the used clients' ClientReports
    status: dict[int, str]
    sim_s: dict[int, float]
    timing: object  # fedsim.devices.RoundClose: on_time, late, seconds
