"""The server: owns the global adapter, validates client updates and merges them.

``ServerState`` is a plain class. By default it lives in the driver process (it only sums
tensors; no process of its own to start or feed); with ``resources.server=actor``
:mod:`actors.pool` runs it as a Ray actor. Linear merges stream: each upload is validated and
added as its client finishes (:meth:`ServerState.stream_add`), so the server holds one adapter,
not one per client. Otherwise, per round it validates each
upload, runs the methods' ``before_merge`` hooks (FedNova rescales), merges the shared tensors
with the heterogeneous-rank rule, runs the ``after_merge`` hooks (FLoRA and FedEx-LoRA fold
into the base weights), applies the server optimiser to the pseudo-gradient and, once the new
global adapter is known to be finite, the ``after_apply`` hooks (SCAFFOLD's server variate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aggregation import RankMerger, StreamingMerge, UpdateRejected, check_update, lora_rank
from aggregation.diagnostics import DiagnosticsParts, rank_energy
from fedsim.messages import (
    AggregateReport,
    Broadcast,
    ClientMeta,
    ExportedAdapter,
    Parts,
    State,
    Upload,
)
from fedsim.methods.base import BaseFolding, MergeBatch, Method, ServerContext


class ServerState:
    """Global adapter, merge rule, server optimiser and the server hooks of the methods.

    Args:
        merger: the heterogeneous-rank merge rule.
        initial: the initial global adapter at the global rank (``s = 1`` space).
        optimizer: a server optimiser from :mod:`aggregation` (``step``, ``state_dict``).
        methods: the enabled methods (:func:`fedsim.config.registry.enabled_methods`), in
            hook order.
        num_clients: the number of clients ``N`` of the federation.
        streaming: merge linear rules one update at a time where the methods allow it.
        diagnostics: compute each round's merge diagnostics (docs/algorithms.md §1.9) into the
            report: ``(R,)`` numbers per client as its update arrives, combined after the merge.
        rank_levels: the federation's client ranks; with ``diagnostics``, the new global
            adapter's energy per rank band (docs/algorithms.md §6.1) joins the diagnostics
            (None: not measured).
    """

    def __init__(
        self,
        merger: RankMerger,
        initial: State,
        optimizer,
        methods: list[Method],
        num_clients: int,
        streaming: bool = False,
        diagnostics: bool = False,
        rank_levels: Sequence[int] | None = None,
    ):
        self.merger = merger
        self.diagnostics = diagnostics
        self.rank_levels = None if rank_levels is None else sorted({int(r) for r in rank_levels})
        self.optimizer = optimizer
        self.methods = list(methods)
        self.template = {k: v.clone() for k, v in initial.items()}
        self.global_state = {k: v.clone() for k, v in initial.items()}
        self.global_rank = lora_rank(initial)
        shared = list(initial)
        for m in self.methods:
            shared = m.filter_shared(shared)
        self.shared = shared
        self.base = BaseFolding()
        context = ServerContext(
            merger, self.template, self.shared, self.global_rank, num_clients, self.base
        )
        for m in self.methods:
            m.bind_server(context)
        self._last_delta_norm = 0.0
        # Linear merges accumulate updates as they arrive when no hook needs them together.
        self.streaming = (
            streaming
            and bool(self.shared)
            and merger.streams
            and not any(m.needs_all_updates() for m in self.methods)
        )
        self._stream: _Stream | None = None

    def streams(self) -> bool:
        """Whether rounds merge updates as they arrive (:meth:`stream_open`)."""
        return self.streaming

    def broadcast(self) -> Broadcast:
        """What every client task of the next round receives (one object in the store)."""
        parts = {m.name: m.broadcast_part() for m in self.methods}
        return Broadcast(
            self.global_state,
            self.base.message(),
            Parts({k: v for k, v in parts.items() if v is not None}),
        )

    def get_global(self) -> State:
        return self.global_state

    def export(self) -> ExportedAdapter:
        """The final global model as a peft adapter (plus base updates it cannot hold)."""
        out = ExportedAdapter(self.global_state, self.global_rank, self.base.delta)
        for m in self.methods:
            out = m.export(out)
        return out

    def state_dict(self) -> dict:
        """Everything that evolves across rounds (for a checkpoint): tensors and plain values."""
        return {
            "global": self.global_state,
            "optimizer": self.optimizer.state_dict(),
            "base": self.base.state_dict(),
            "methods": {m.name: m.state_dict() for m in self.methods},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (from a checkpoint).

        Raises:
            ValueError: the saved state does not fit this run (keys, shapes, methods).
        """
        saved = state["global"]
        if set(saved) != set(self.global_state) or any(
            saved[k].shape != self.global_state[k].shape for k in saved
        ):
            raise ValueError("the checkpoint's global adapter does not fit this run's backbone")
        methods = state.get("methods", {})
        missing = [m.name for m in self.methods if m.name not in methods]
        if missing:
            raise ValueError(f"the checkpoint holds no state of the method(s) {missing}")
        self.global_state = {k: saved[k].clone() for k in self.global_state}
        self.optimizer.load_state_dict(state["optimizer"])
        self.base.load_state_dict(state.get("base") or {})
        for m in self.methods:
            m.load_state_dict(methods[m.name])

    def aggregate(
        self, round_idx: int, clients: list[ClientMeta], uploads: list[Upload]
    ) -> AggregateReport:
        """Validate and merge the uploads of one round.

        Args:
            round_idx: the round (for the report).
            clients: the metadata of each upload, in the same order.
            uploads: the clients' uploads (shared keys, ``s = 1`` space).

        Returns:
            The report; the global adapter is unchanged if every update was rejected.
        """
        start = time.perf_counter()
        report = AggregateReport(round_idx)
        if not self.shared:  # local-only training: nothing reaches the server
            report.accepted = sorted(c.client_id for c in clients)
            return report
        reference = {k: self.template[k] for k in self.shared}
        kept: list[tuple[ClientMeta, Upload]] = []
        for meta, upload in sorted(zip(clients, uploads), key=lambda x: x[0].client_id):
            try:
                self._check(meta, upload, reference)
            except UpdateRejected as exc:
                report.rejected[meta.client_id] = str(exc)
                continue
            kept.append((meta, upload))
        if kept:
            report.nonfinite = self._merge(kept, report)
            if not report.nonfinite:
                report.global_delta_norm = self._last_delta_norm
                report.accepted = [m.client_id for m, _ in kept]
        report.aggregate_s = time.perf_counter() - start
        return report

    def aggregate_packed(
        self, round_idx: int, clients: list[ClientMeta], *uploads: Upload
    ) -> AggregateReport:
        """:meth:`aggregate` with the uploads as positional args.

        Ray resolves object refs only when they are top-level arguments, so the driver passes
        the clients' upload refs this way and they never travel through the driver.
        """
        return self.aggregate(round_idx, clients, list(uploads))

    # -- streaming: one update at a time, in client-id order ---------------------------------
    def stream_open(self, round_idx: int) -> None:
        """Start round ``round_idx``'s streaming merge (:attr:`streaming` must be true).

        The caller adds the updates in client-id order (:class:`aggregation.InOrder` buffers
        early arrivals), which makes the sums, and so the result, the same bits whatever the
        order in which the clients finished.
        """
        if not self.streaming:
            raise RuntimeError("this server merges in batches (see ServerState.streaming)")
        current = {k: self.global_state[k] for k in self.shared}
        reference = {k: self.template[k] for k in self.shared}
        merge = self.merger.stream(current, self.global_rank, reference)
        self._stream = _Stream(AggregateReport(round_idx), merge, current, reference)
        if self.diagnostics:
            self._stream.diag = DiagnosticsParts(self.merger, self.global_rank, current)

    def stream_add(self, meta: ClientMeta, upload: Upload) -> None:
        """Validate one upload and add it to the open merge (a rejection is reported)."""
        stream = self._stream
        start = time.perf_counter()
        try:
            self._check(meta, upload, stream.reference)
        except UpdateRejected as exc:
            stream.report.rejected[meta.client_id] = str(exc)
        else:
            stream.merge.add(upload.update, meta.rank, meta.num_samples)
            stream.clients.append(meta)
            if stream.diag is not None:
                dims = self._upload_dimensions(upload)
                stream.diag.add(upload.update, meta.rank, meta.num_samples, dims)
        stream.report.aggregate_s += time.perf_counter() - start

    def stream_close(self, apply: bool = True) -> AggregateReport:
        """Finish the open merge and apply it (``apply=False``: drop it, e.g. too few
        clients reported); the report as :meth:`aggregate` gives it."""
        stream, self._stream = self._stream, None
        if not apply:
            return AggregateReport(stream.report.round_idx)
        report = stream.report
        start = time.perf_counter()
        if stream.clients:
            batch = MergeBatch(
                clients=stream.clients, updates=[], uploads=[], current=stream.current
            )
            report.nonfinite = self._apply(batch, stream.merge.result(), report, stream.diag)
            if not report.nonfinite:
                report.global_delta_norm = self._last_delta_norm
                report.accepted = [m.client_id for m in stream.clients]
        report.aggregate_s += time.perf_counter() - start
        return report

    def _check(self, meta: ClientMeta, upload: Upload, reference: State) -> None:
        if meta.num_samples <= 0:
            raise UpdateRejected(f"sample count must be positive, got {meta.num_samples}")
        check_update(upload.update, reference, meta.rank)

    def _merge(self, kept: list[tuple[ClientMeta, Upload]], report: AggregateReport) -> list[str]:
        """Merge the accepted uploads into the global state; the hooks' metrics and client
        columns go to ``report``.

        Returns:
            The keys whose merged value is not finite (an overflow in the merge or the server
            optimiser); then nothing is applied, and the server's state is not to be trusted
            any further (the driver stops the run).
        """
        current = {k: self.global_state[k] for k in self.shared}
        batch = MergeBatch(
            clients=[m for m, _ in kept],
            updates=[u.update for _, u in kept],
            uploads=[u for _, u in kept],
            current=current,
        )
        for m in self.methods:
            m.before_merge(batch)
        report.metrics, report.columns = batch.metrics, batch.columns
        diag = None
        if self.diagnostics:  # what the merge receives, after the before_merge hooks
            diag = DiagnosticsParts(self.merger, self.global_rank, current)
            for meta, update, upload in zip(batch.clients, batch.updates, batch.uploads):
                dims = self._upload_dimensions(upload)
                diag.add(update, meta.rank, meta.num_samples, dims)
        merged = self.merger.merge(
            batch.updates,
            batch.ranks,
            batch.num_samples,
            previous=current,
            global_rank=self.global_rank,
        )
        return self._apply(batch, merged, report, diag)

    def _upload_dimensions(self, upload: Upload) -> Sequence[int] | None:
        """The global dimensions the upload's rank positions stand for, as the first method
        that says so gives them (Fed-PLoRA's modules); None: its leading ones."""
        for m in self.methods:
            dims = m.upload_dimensions(upload)
            if dims is not None:
                return dims
        return None

    def _diagnose(
        self, diag: DiagnosticsParts, clients: list[ClientMeta], new: State, report: AggregateReport
    ) -> None:
        """The round's merge diagnostics: per-dimension vectors (and the new global adapter's
        energy per rank band) into ``report.diagnostics``, per-client columns into
        ``report.columns``."""
        result = diag.result(new)
        report.diagnostics = result.dimensions()
        # a merge that hands out a fresh adapter each round (FLoRA) keeps no global product
        if self.rank_levels is not None and not self.merger.fresh_adapter_each_round:
            energy = rank_energy(new, self.rank_levels, self.global_rank)
            if energy is not None:
                report.diagnostics["energy"] = energy
        ids = [m.client_id for m in clients]
        for cid, columns in result.client_columns(ids).items():
            report.columns.setdefault(cid, {}).update(columns)

    def _apply(
        self,
        batch: MergeBatch,
        merged: State,
        report: AggregateReport,
        diag: DiagnosticsParts | None = None,
    ) -> list[str]:
        """The after-merge hooks, the server optimiser and, when finite, the new global (and
        the round's diagnostics when ``diag`` holds the clients' parts)."""
        current = batch.current
        for m in self.methods:
            merged = m.after_merge(batch, merged)
        new = self.optimizer.step(current, merged)
        # The norm of the change is needed anyway; it is finite exactly when every merged
        # value is (a sum of squares of finite float32 differences cannot overflow float64).
        delta = sum(float((new[k].double() - current[k].double()).pow(2).sum()) for k in new)
        nonfinite = [] if math.isfinite(delta) else _nonfinite_keys(new)
        if self.base.delta is not None:  # updates folded into the base weights
            nonfinite += [f"base update of {k}" for k in _nonfinite_keys(self.base.delta)]
        if nonfinite:
            return nonfinite
        self._last_delta_norm = math.sqrt(delta)
        if diag is not None and len(diag):
            self._diagnose(diag, batch.clients, new, report)
        self.global_state = {**self.global_state, **new}
        for m in self.methods:
            m.after_apply(batch)
        return []


@dataclass
class _Stream:
    """An open streaming merge: its report so far, the accumulator, the accepted clients."""

    report: AggregateReport
    merge: StreamingMerge
    current: State  # the global adapter's shared tensors before this merge
    reference: State  # what uploads are validated against (the initial global's keys, shapes)
    clients: list[ClientMeta] = field(default_factory=list)
    diag: DiagnosticsParts | None = None  # the accepted updates' part of the diagnostics


def _nonfinite_keys(state: State) -> list[str]:
    """The keys of ``state`` whose tensor holds NaN or Inf."""
    return [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
