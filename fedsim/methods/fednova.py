"""FedNova (docs/algorithms.md §3.4): normalised averaging of clients that took different step
counts.

Clients train plainly; before the merge the server rescales each update by its local step
count (:func:`aggregation.fednova_rescale`), relative to the global view the client received.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from aggregation import fednova_rescale
from fedsim.methods.base import MergeBatch, ObjectiveMethod, check_weighted_sum_merge

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


class FedNova(ObjectiveMethod):
    """``objective.method=fednova``."""

    name: ClassVar[str] = "fednova"
    order: ClassVar[int] = 40
    leading_dimensions: ClassVar[bool] = True

    @classmethod
    def dp_conflict(cls, cfg: FedSimConfig) -> str | None:
        return (
            "objective.method=fednova rescales each clipped update by its local step count, "
            "which breaks the privacy.clip_norm bound (and the step count is private)"
        )

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        if cls.enabled(cfg):
            check_weighted_sum_merge(cfg, "objective.method", cls.name)

    def before_merge(self, batch: MergeBatch) -> None:
        views = [self.server.merger.redistribute(batch.current, r) for r in batch.ranks]
        steps = [c.steps for c in batch.clients]
        batch.updates = fednova_rescale(batch.updates, views, steps, batch.num_samples)
