"""The server: owns the global adapter, validates client updates and merges them.

``ServerState`` is a plain class; :mod:`actors.pool` runs it as a Ray actor so the merge runs
next to the updates in the object store, not in the driver.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from aggregation import RankMerger, UpdateRejected, check_update, lora_rank

State = dict[str, torch.Tensor]


@dataclass
class AggregateReport:
    """What one merge did: accepted and rejected clients, timing, the global update's size."""

    round_idx: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    aggregate_s: float = 0.0
    global_delta_norm: float = 0.0


class ServerState:
    """Global adapter plus the merge rule.

    Args:
        merger: the heterogeneous-rank merge rule.
        initial: the initial global adapter at the global rank (``s = 1`` space).
    """

    def __init__(self, merger: RankMerger, initial: State):
        self.merger = merger
        self.global_state = {k: v.clone() for k, v in initial.items()}
        self.global_rank = lora_rank(initial)

    def get_global(self) -> State:
        return self.global_state

    def aggregate(
        self, round_idx: int, clients: list[tuple[int, int, int]], *updates: State
    ) -> AggregateReport:
        """Validate and merge the updates of one round.

        Args:
            round_idx: the round (for the report).
            clients: ``(client_id, rank, num_samples)`` per update, in the updates' order.
            updates: the clients' uploads.

        Returns:
            The report; the global adapter is replaced unless every update was rejected.
        """
        start = time.perf_counter()
        report = AggregateReport(round_idx)
        kept: list[tuple[int, int, int, State]] = []
        for (cid, rank, n), update in sorted(zip(clients, updates), key=lambda x: x[0][0]):
            try:
                if n <= 0:
                    raise UpdateRejected(f"sample count must be positive, got {n}")
                check_update(update, self.global_state, rank)
            except UpdateRejected as exc:
                report.rejected[cid] = str(exc)
                continue
            kept.append((cid, rank, n, update))
        if kept:
            merged = self.merger.merge(
                [u for *_, u in kept],
                [r for _, r, _, _ in kept],
                [n for _, _, n, _ in kept],
                previous=self.global_state,
                global_rank=self.global_rank,
            )
            delta = sum(
                float((merged[k].double() - self.global_state[k].double()).pow(2).sum())
                for k in merged
            )
            self.global_state = merged
            report.accepted = [cid for cid, *_ in kept]
            report.global_delta_norm = math.sqrt(delta)
        report.aggregate_s = time.perf_counter() - start
        return report
