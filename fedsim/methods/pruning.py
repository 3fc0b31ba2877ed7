"""HetLoRA's rank self-pruning (docs/algorithms.md §1.4), on the client.

While a client's rank can still drop by ``pruning.delta`` without going below
``pruning.min_rank``, its local loss gets ``gamma * ||B[:, r-delta:] A[r-delta:]||_F``; after
training, a tail whose norm is below ``pruning.threshold`` is dropped from the next round on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from aggregation import hetlora_tail_norm, is_lora
from fedsim.config import limits
from fedsim.errors import ConfigError
from fedsim.methods.base import ClientStep, Method, Params, configured_merger

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


class Pruning(Method):
    """``pruning.gamma > 0``."""

    name: ClassVar[str] = "pruning"
    order: ClassVar[int] = 60
    leading_dimensions: ClassVar[bool] = True

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.pruning.gamma > 0

    @classmethod
    def dp_conflict(cls, cfg: FedSimConfig) -> str | None:
        return (
            "pruning.gamma > 0 lowers a client's rank from its private tail norm, and the "
            "rank is public (it sets the cohort's noise shares and the merge's denominators)"
        )

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        p = cfg.pruning
        for key, ok, want in (
            (
                "gamma",
                0 <= p.gamma <= limits.MAX_COEFFICIENT,
                f"in [0, {limits.MAX_COEFFICIENT:g}]",
            ),
            ("delta", p.delta >= 1, ">= 1"),
            ("threshold", p.threshold >= 0, ">= 0"),
            ("min_rank", p.min_rank >= 1, ">= 1"),
        ):
            if not ok:
                raise ConfigError(f"pruning.{key}", f"must be {want}, got {getattr(p, key)}")
        if p.gamma > 0:
            from fedsim.config.ranks import resolve_ranks

            top = max(resolve_ranks(cfg.clients, cfg.seed))
            if top - p.delta < p.min_rank:  # the penalty would apply to no client, ever
                raise ConfigError(
                    "pruning.min_rank",
                    f"no client can prune: the largest rank {top} minus pruning.delta="
                    f"{p.delta} is below pruning.min_rank={p.min_rank}, so the tail penalty "
                    "(pruning.gamma) never applies; lower pruning.delta or pruning.min_rank",
                )
        merger = configured_merger(cfg)
        if (
            p.gamma > 0
            and merger is not None
            and not (merger.linear_in_factors and merger.fixed_rank)
        ):
            raise ConfigError(
                "pruning.gamma",
                "rank self-pruning changes client ranks between rounds; "
                f"aggregation.method={cfg.aggregation.method} cannot take that (use zeropad, "
                "fedilora or hetlora)",
            )

    def _prunes(self, rank: int) -> bool:
        p = self.cfg.pruning
        return rank - p.delta >= p.min_rank

    def before_training(self, step: ClientStep) -> None:
        if self._prunes(step.task.rank):
            gamma, delta = self.cfg.pruning.gamma, self.cfg.pruning.delta
            step.objective.penalties.append(lambda params: _tail(params, gamma, delta))

    def after_training(self, step: ClientStep) -> None:
        rank = step.task.rank
        if not self._prunes(rank):
            step.report[self.name] = None
            return
        p = self.cfg.pruning
        tail = float(
            hetlora_tail_norm({k: v for k, v in step.local.items() if is_lora(k)}, p.delta)
        )
        step.report[self.name] = tail
        if tail < p.threshold:
            step.next_rank = rank - p.delta


def _tail(params: Params, gamma: float, delta: int):
    return gamma * hetlora_tail_norm({k: p for k, p in params.items() if is_lora(k)}, delta)
