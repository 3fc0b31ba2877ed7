"""Robust aggregation (docs/algorithms.md §4b) as a layer in front of any heterogeneous-rank merge.

The layer works on each accepted client's update ``u_i = x_i - x0_i``: its uploaded factors
minus what it started from (the merge rule's rank-``r_i`` view of the global adapter, in the
``s = 1`` space). It changes or drops updates; the configured merge (zero-padding, FediLoRA,
HetLoRA, FlexLoRA, FLoRA) then runs on what is left, so every rule composes with every merge.

- ``robust.clip_norm`` (norm bounding, with any rule or alone): ``u_i <- u_i min(1, C/||u_i||)``
  over the client's own factors (the dimensions it covers; padding adds nothing to a norm).
- ``median``, ``trimmed_mean``: per coordinate over the clients that cover it. A rank
  dimension ``j`` of a LoRA factor is covered by the clients with ``r_i > j``, so a rank-4
  client's zero padding never counts as a vote on dimension 20. Every covering client's value
  is replaced by the statistic, so the merge's weighted average returns it exactly.
- ``krum``, ``multi_krum``: scores on the factors zero-padded to the global rank ``R`` (the
  space Krum's distances need one length for); the ``m`` best-scored clients are merged
  (``krum``: one). With heterogeneous ranks the padding makes honest clients of a rare rank
  look far from the rest: that is the unfairness the ``product`` rule removes.
- ``product`` (fedsim's rank-aware rule): distances between the clients' low-rank products
  ``dW_i = B_i A_i - B0_i A0_i`` per module (rank-free: a rank-4 and a rank-32 client that
  learnt the same function are close), each module normalised by its median distance and
  summed; a client's score is its median distance to the others; clients scoring above
  ``robust.threshold`` times the median score are left out (never a majority).

Logged per round: ``robust/rejected`` and ``robust/clipped``; per client in the round's table:
``robust_norm`` (its update's norm before clipping), ``robust_clipped``, ``robust_score``
(Krum or product rules) and ``robust_kept``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

from aggregation import (
    coordinate_median,
    covered_statistic,
    krum_scores,
    pad,
    product_distances,
    product_outliers,
    trimmed_mean,
)
from fedsim.errors import ConfigError
from fedsim.messages import State
from fedsim.methods.base import MergeBatch, Method, configured_merger

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig

RULES = ("none", "median", "trimmed_mean", "krum", "multi_krum", "product")


class Robust(Method):
    """``robust.rule`` other than none, or ``robust.clip_norm > 0``."""

    name: ClassVar[str] = "robust"
    order: ClassVar[int] = 30
    leading_dimensions: ClassVar[bool] = True

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.robust.rule != "none" or cfg.robust.clip_norm > 0

    @classmethod
    def dp_conflict(cls, cfg: FedSimConfig) -> str | None:
        if cfg.robust.rule == "none":
            return None  # norm bounding alone (robust.clip_norm) composes
        return (
            f"robust.rule={cfg.robust.rule} selects or combines the updates by looking at "
            "all of them, so one client can change more than its own clipped contribution "
            "and the noise does not cover it; use robust.rule=none (robust.clip_norm "
            "composes)"
        )

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        r = cfg.robust
        if not (math.isfinite(r.clip_norm) and r.clip_norm >= 0):
            raise ConfigError("robust.clip_norm", f"must be >= 0 (0: off), got {r.clip_norm}")
        if not 0 <= r.trim < 0.5:
            raise ConfigError("robust.trim", f"must be in [0, 0.5), got {r.trim}")
        if r.num_faulty < 0:
            raise ConfigError("robust.num_faulty", f"must be >= 0, got {r.num_faulty}")
        if r.num_selected < 0:
            raise ConfigError(
                "robust.num_selected", f"must be >= 0 (0: n - f), got {r.num_selected}"
            )
        if not (math.isfinite(r.threshold) and r.threshold > 1):
            raise ConfigError("robust.threshold", f"must be a number above 1, got {r.threshold}")
        if not cls.enabled(cfg):
            return
        _check_round_size(cfg)
        merger = configured_merger(cfg)
        fresh = merger is not None and merger.fresh_adapter_each_round
        if fresh and (r.rule != "product" or r.clip_norm > 0):
            raise ConfigError(
                "robust.rule" if r.rule != "product" else "robust.clip_norm",
                f"aggregation.method={cfg.aggregation.method} starts every client from a "
                "fresh seeded adapter the server does not hold, so an update in factor space "
                "is undefined; use robust.rule=product (its products B_i A_i start at zero) "
                "without robust.clip_norm",
            )
        if r.rule == "product" and cfg.sharing.policy != "all":
            raise ConfigError(
                "robust.rule",
                f"product needs both factors of every module on the server to form B_i A_i, "
                f"but sharing.policy={cfg.sharing.policy}; use sharing.policy=all or a "
                "factor rule (median, trimmed_mean, krum, multi_krum)",
            )

    # -- server ---------------------------------------------------------------------------
    def before_merge(self, batch: MergeBatch) -> None:
        r = self.cfg.robust
        server = self.server
        fresh = server.merger.fresh_adapter_each_round
        views: dict[int, State] = {}
        origins = [
            self._origin(batch, meta.rank, fresh, views, u)
            for meta, u in zip(batch.clients, batch.updates)
        ]
        deltas = [{k: _wide(u[k]) - _wide(o[k]) for k in u} for u, o in zip(batch.updates, origins)]
        ids = [m.client_id for m in batch.clients]
        metrics = {"robust/clipped": 0.0, "robust/rejected": 0.0}
        for cid, d in zip(ids, deltas):
            batch.column(cid, robust_norm=_norm(d))
        if r.clip_norm > 0:
            for i, d in enumerate(deltas):
                norm = _norm(d)
                clipped = norm > r.clip_norm
                if clipped:
                    deltas[i] = {k: v * (r.clip_norm / norm) for k, v in d.items()}
                    metrics["robust/clipped"] += 1
                batch.column(ids[i], robust_clipped=clipped)
        if r.rule in ("median", "trimmed_mean"):
            stat = (
                coordinate_median
                if r.rule == "median"
                else (lambda states: trimmed_mean(states, r.trim))
            )
            deltas = covered_statistic(deltas, batch.ranks, stat)
        keep = list(range(len(deltas)))
        scores = None
        if r.rule in ("krum", "multi_krum"):
            keep, scores = self._krum(deltas, batch.ranks, metrics)
        elif r.rule == "product":
            dist, _ = product_distances(
                [{k: _wide(o[k]) + d[k] for k in d} for o, d in zip(origins, deltas)], origins
            )
            scores, rejected = product_outliers(dist, r.threshold)
            keep = [i for i in keep if i not in rejected]
        if scores is not None:
            for cid, s in zip(ids, scores):
                batch.column(cid, robust_score=s)
        for i, cid in enumerate(ids):
            batch.column(cid, robust_kept=i in keep)
        metrics["robust/rejected"] = float(len(ids) - len(keep))
        batch.metrics.update(metrics)
        batch.updates = [
            {k: (_wide(origins[i][k]) + deltas[i][k]).to(batch.updates[i][k].dtype) for k in d}
            for i, d in enumerate(deltas)
        ]
        batch.keep(keep)

    def _origin(
        self, batch: MergeBatch, rank: int, fresh: bool, views: dict, update: State
    ) -> State:
        """What a rank-``rank`` client started from (``s = 1`` space, shared keys)."""
        if rank not in views:
            views[rank] = self.server.merger.redistribute(batch.current, rank)
        view = views[rank]
        if fresh:  # FLoRA: a fresh adapter with B = 0 (B0 A0 = 0), the dense keys handed back
            return {k: view[k] if k in view else torch.zeros_like(update[k]) for k in update}
        return {k: view[k] for k in update}

    def _krum(self, deltas, ranks, metrics) -> tuple[list[int], list[float] | None]:
        """(Multi-)Krum on the updates zero-padded to the global rank."""
        r = self.cfg.robust
        n = len(deltas)
        if n - r.num_faulty - 2 < 1:  # too few clients this round for Krum's condition
            metrics["robust/skipped"] = 1.0
            return list(range(n)), None
        padded = [pad(d, self.server.global_rank) for d in deltas]
        scores = krum_scores(padded, r.num_faulty)
        m = 1 if r.rule == "krum" else (r.num_selected or n - r.num_faulty)
        m = min(m, n)
        order = sorted(range(n), key=lambda i: (scores[i], i))
        return sorted(order[:m]), scores


def _check_round_size(cfg: FedSimConfig) -> None:
    """Refuse a rule that can never act on the clients a round samples.

    ``n`` is the clients sampled per round, the most a round can merge (failures, stragglers
    and rejected updates only lower it; a round below the rule's need merges everyone and
    logs ``robust/skipped``). Krum scores a client by its ``n - f - 2`` nearest distances, so
    it needs ``n >= f + 3`` (its guarantee, Blanchard et al. 2017, needs ``n > 2f + 2``);
    Multi-Krum merges ``m <= n - f`` of them; the trimmed mean drops ``floor(beta n)`` values
    at each end, nothing at all when ``beta n < 1``.

    Raises:
        ConfigError: naming the key to change, with the numbers.
    """
    from fedsim.config.checks import clients_per_round

    r = cfg.robust
    n = clients_per_round(cfg)
    sampled = (
        f"clients.num={cfg.clients.num} x clients.fraction={cfg.clients.fraction:g} samples "
        f"{n} client{'s' if n != 1 else ''} per round"
    )
    if r.rule in ("krum", "multi_krum") and n < r.num_faulty + 3:
        raise ConfigError(
            "robust.num_faulty",
            f"robust.rule={r.rule} with num_faulty f={r.num_faulty} scores each client by "
            f"its n - f - 2 nearest neighbours and needs n >= f + 3 = {r.num_faulty + 3} "
            f"clients, but {sampled}: every round would merge them all; lower "
            "robust.num_faulty or sample more clients",
        )
    if r.rule == "multi_krum" and r.num_selected > n - r.num_faulty:
        raise ConfigError(
            "robust.num_selected",
            f"multi_krum merges at most n - f = {n} - {r.num_faulty} = {n - r.num_faulty} "
            f"clients ({sampled}, robust.num_faulty={r.num_faulty}), not "
            f"{r.num_selected}; set robust.num_selected <= {n - r.num_faulty} (0: n - f)",
        )
    if r.rule == "trimmed_mean" and math.floor(r.trim * n) < 1:
        if n < 3:  # trim < 0.5: floor(trim * n) >= 1 needs n >= 3
            fix = "sample at least 3 clients per round (robust.trim < 0.5)"
        else:
            fix = f"set robust.trim >= {math.ceil(1000 / n) / 1000:g}"
            if r.trim > 0 and 1 / r.trim <= cfg.clients.num:
                fix += f" or sample at least {math.ceil(1 / r.trim)} clients per round"
        raise ConfigError(
            "robust.trim",
            f"trimmed_mean drops floor(trim x n) = floor({r.trim:g} x {n}) = 0 clients at "
            f"each end ({sampled}): it would be the plain mean; {fix}",
        )


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _norm(state: State) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))
