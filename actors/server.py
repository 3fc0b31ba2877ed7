"""The server: owns the global adapter, validates client updates and merges them.

``ServerState`` is a plain class; :mod:`actors.pool` runs it as a Ray actor so the merge runs
next to the updates in the object store, not in the driver. Per round it validates each
update, optionally rescales them (FedNova), merges the shared tensors with the heterogeneous-
rank rule, applies the server optimiser to the pseudo-gradient, updates SCAFFOLD's server
variate and, for FLoRA, folds the stacked product into the base-weight updates it broadcasts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from aggregation import (
    RankMerger,
    UpdateRejected,
    check_update,
    fednova_rescale,
    flora_delta,
    lora_rank,
    scaffold_server_variate,
)

State = dict[str, torch.Tensor]


@dataclass
class AggregateReport:
    """What one merge did: accepted and rejected clients, timing, the global update's size."""

    round_idx: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    aggregate_s: float = 0.0
    global_delta_norm: float = 0.0
    nonfinite: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ServerOptions:
    """How the server combines updates, beyond the merge rule.

    Attributes:
        shared: the keys clients upload (their sharing policy); others stay at their init.
        optimizer: a server optimiser from :mod:`aggregation` (``step``, ``is_identity``).
        fednova: rescale updates by their local step counts before merging.
        scaffold_clients: total number of clients N if SCAFFOLD is on, else None.
    """

    shared: tuple[str, ...]
    optimizer: object
    fednova: bool = False
    scaffold_clients: int | None = None


class ServerState:
    """Global adapter, merge rule and the server-side state of the configured methods.

    Args:
        merger: the heterogeneous-rank merge rule.
        initial: the initial global adapter at the global rank (``s = 1`` space).
        options: the other server-side choices.
    """

    def __init__(self, merger: RankMerger, initial: State, options: ServerOptions):
        self.merger = merger
        self.options = options
        self.template = {k: v.clone() for k, v in initial.items()}
        self.global_state = {k: v.clone() for k, v in initial.items()}
        self.global_rank = lora_rank(initial)
        self.shared = [k for k in initial if k in set(options.shared)]
        self.scaffold_c = (
            {k: torch.zeros_like(initial[k]) for k in self.shared}
            if options.scaffold_clients
            else None
        )
        self.base_delta: dict[str, torch.Tensor] | None = None
        self.base_version = 0
        self.stacked: list[State] = []  # FLoRA: every round's stacked LoRA, for the export

    def broadcast(self) -> dict:
        """What every client task of the next round receives (one object in the store)."""
        return {
            "adapter": self.global_state,
            "scaffold_c": self.scaffold_c,
            "base_delta": self.base_delta,
            "base_version": self.base_version,
            # FLoRA sends the last round's stacked factors, which clients fold into their base
            "base_bytes": sum(t.numel() * t.element_size() for t in self.stacked[-1].values())
            if self.stacked
            else 0,
        }

    def get_global(self) -> State:
        return self.global_state

    def state_dict(self) -> dict:
        """Everything that evolves across rounds (for a checkpoint): tensors and plain values."""
        return {
            "global": self.global_state,
            "optimizer": self.options.optimizer.state_dict(),
            "scaffold_c": self.scaffold_c,
            "base_delta": self.base_delta,
            "base_version": self.base_version,
            "stacked": self.stacked,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (from a checkpoint).

        Raises:
            ValueError: the saved global adapter does not have this run's keys and shapes.
        """
        saved = state["global"]
        if set(saved) != set(self.global_state) or any(
            saved[k].shape != self.global_state[k].shape for k in saved
        ):
            raise ValueError("the checkpoint's global adapter does not fit this run's backbone")
        self.global_state = {k: saved[k].clone() for k in self.global_state}
        self.options.optimizer.load_state_dict(state["optimizer"])
        self.scaffold_c = state.get("scaffold_c") if self.scaffold_c is not None else None
        self.base_delta = state.get("base_delta")
        self.base_version = int(state.get("base_version", 0))
        self.stacked = list(state.get("stacked") or [])

    def stacked_history(self) -> list[State]:
        """FLoRA: the stacked LoRA of every round (their products sum to the base updates)."""
        return self.stacked

    def aggregate(
        self,
        round_idx: int,
        clients: list[tuple[int, int, int, int]],
        updates: list[State],
        scaffold_deltas: list[State | None] | None = None,
    ) -> AggregateReport:
        """Validate and merge the updates of one round.

        Args:
            round_idx: the round (for the report).
            clients: ``(client_id, rank, num_samples, local_steps)`` per update, in order.
            updates: the clients' uploads (shared keys, ``s = 1`` space).
            scaffold_deltas: SCAFFOLD's ``c_i+ - c_i`` per client, if SCAFFOLD is on.

        Returns:
            The report; the global adapter is unchanged if every update was rejected.
        """
        start = time.perf_counter()
        report = AggregateReport(round_idx)
        if not self.shared:  # local-only training: nothing reaches the server
            report.accepted = sorted(m[0] for m in clients)
            return report
        deltas = scaffold_deltas or [None] * len(updates)
        reference = {k: self.template[k] for k in self.shared}
        kept = []
        for meta, update, delta in sorted(zip(clients, updates, deltas), key=lambda x: x[0][0]):
            cid, rank, n, _ = meta
            try:
                if n <= 0:
                    raise UpdateRejected(f"sample count must be positive, got {n}")
                check_update(update, reference, rank)
            except UpdateRejected as exc:
                report.rejected[cid] = str(exc)
                continue
            kept.append((meta, update, delta))
        if kept:
            report.nonfinite = self._merge(kept)
            if not report.nonfinite:
                report.global_delta_norm = self._last_delta_norm
                report.accepted = [m[0] for m, _, _ in kept]
        report.aggregate_s = time.perf_counter() - start
        return report

    def aggregate_packed(
        self, round_idx: int, clients: list[tuple[int, int, int, int]], *tensors
    ) -> AggregateReport:
        """:meth:`aggregate` with updates (then SCAFFOLD deltas, if any) as positional args.

        Ray resolves object refs only when they are top-level arguments, so the driver passes
        the clients' update refs this way and they never travel through the driver.
        """
        n = len(clients)
        deltas = list(tensors[n:]) if len(tensors) > n else None
        return self.aggregate(round_idx, clients, list(tensors[:n]), deltas)

    def _merge(self, kept) -> list[str]:
        """Merge the accepted updates into the global state.

        Returns:
            The keys whose merged value is not finite (an overflow in the merge or the server
            optimiser); then nothing is applied, and the server's state is not to be trusted
            any further (the driver stops the run).
        """
        ranks = [m[1] for m, _, _ in kept]
        counts = [m[2] for m, _, _ in kept]
        updates = [u for _, u, _ in kept]
        current = {k: self.global_state[k] for k in self.shared}
        if self.options.fednova:
            refs = [self.merger.redistribute(current, r) for r in ranks]
            updates = fednova_rescale(updates, refs, [m[3] for m, _, _ in kept], counts)
        merged = self.merger.merge(
            updates, ranks, counts, previous=current, global_rank=self.global_rank
        )
        if self.merger.fresh_adapter_each_round:
            merged = self._fold_into_base(merged)
        new = self.options.optimizer.step(current, merged)
        # The norm of the change is needed anyway; it is finite exactly when every merged
        # value is (a sum of squares of finite float32 differences cannot overflow float64).
        delta = sum(float((new[k].double() - current[k].double()).pow(2).sum()) for k in new)
        nonfinite = [] if math.isfinite(delta) else _nonfinite_keys(new)
        if self.base_delta is not None:  # FLoRA's folded base updates
            nonfinite += [f"base update of {k}" for k in _nonfinite_keys(self.base_delta)]
        if nonfinite:
            return nonfinite
        self._last_delta_norm = math.sqrt(delta)
        self.global_state = {**self.global_state, **new}
        if self.scaffold_c is not None:
            self.scaffold_c = scaffold_server_variate(
                self.scaffold_c,
                [d for _, _, d in kept],
                ranks,
                self.options.scaffold_clients,
                self.global_rank,
            )
        return []

    def _fold_into_base(self, stacked: State) -> State:
        """FLoRA: add ``B_g @ A_g`` to the base updates; the adapter restarts from its init."""
        lora = {k: v for k, v in stacked.items() if k.endswith(("lora_A.weight", "lora_B.weight"))}
        self.stacked.append(lora)
        product = flora_delta(lora)
        if self.base_delta is None:
            self.base_delta = product
        else:
            self.base_delta = {k: self.base_delta[k] + product[k] for k in product}
        self.base_version += 1
        dense = {k: v for k, v in stacked.items() if k not in lora}
        return {**{k: self.template[k] for k in lora}, **dense}


def _nonfinite_keys(state: State) -> list[str]:
    """The keys of ``state`` whose tensor holds NaN or Inf."""
    return [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
