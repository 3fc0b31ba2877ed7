"""FediLoRA's layer-wise model editing (ALGORITHMS 1.3), on the client after local training.

From round 2 on, a client compares each of its shared tensors with the global one it received
and pulls the least similar ``editing.count`` of them (cosine below ``editing.threshold``)
toward the global value. The math is :func:`aggregation.edit_layerwise`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from aggregation import MERGERS, edit_layerwise
from fedsim.errors import ConfigError
from fedsim.messages import ClientReport
from fedsim.methods.base import ClientStep, Method

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


@dataclass
class EditingConfig:
    enabled: bool = field(
        default=True, metadata={"help": "FediLoRA layer-wise model editing (clients, round >= 2)."}
    )
    key: Literal["lora_A", "lora_B", "all"] = field(
        default="lora_A", metadata={"help": "Which LoRA tensors are candidates for editing."}
    )
    count: int = field(default=1, metadata={"help": "How many lowest-similarity tensors to edit."})
    threshold: float = field(default=0.95, metadata={"help": "Edit only if cosine < threshold."})
    mode: Literal["weighted", "replace", "half"] = field(
        default="weighted",
        metadata={"help": "weighted: mix by clamped cosine; replace; half."},
    )


@dataclass
class EditReport:
    """What editing did to one client's update."""

    edited: list[str]
    similarities: dict[str, float]


class Editing(Method):
    """``editing.enabled=true``."""

    name: ClassVar[str] = "editing"
    summary: ClassVar[str] = "editing.enabled: FediLoRA's layer-wise model editing"

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.editing.enabled

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        e = cfg.editing
        if e.count < 1:
            raise ConfigError("editing.count", f"must be >= 1, got {e.count}")
        if not 0 <= e.threshold <= 1.0 + 1e-9:
            raise ConfigError("editing.threshold", "must be in [0, 1]")
        if not cfg.editing.enabled:
            return
        merger = MERGERS.get(cfg.aggregation.method)
        policy = cfg.sharing.policy
        fresh = merger is not None and merger.fresh_adapter_each_round
        if fresh or policy == "none":
            without = (
                f"aggregation.method={cfg.aggregation.method}" if fresh else "sharing.policy=none"
            )
            raise ConfigError(
                "editing.enabled",
                "layer-wise editing compares a client's adapter with the global one it "
                f"received, which does not exist with {without}; set editing.enabled=false",
            )
        private = {"B": "lora_A", "A": "lora_B"}.get(policy)
        if cfg.editing.key == private:
            raise ConfigError(
                "editing.key",
                f"editing.key={cfg.editing.key} edits tensors that sharing.policy={policy} "
                "keeps private (there is no global version to compare with); use the shared "
                "part or all",
            )

    def after_training(self, step: ClientStep) -> None:
        if step.task.round_idx < 2:
            step.report[self.name] = EditReport([], {})
            return
        e = self.cfg.editing
        result = edit_layerwise(
            {k: step.local[k] for k in step.shared},
            {k: step.received[k] for k in step.shared},
            key=e.key,
            count=e.count,
            threshold=e.threshold,
            mode=e.mode,
        )
        if result.edited:
            step.local = {**step.local, **result.state}
        step.report[self.name] = EditReport(list(result.edited), dict(result.similarities))

    def round_metrics(self, reports: Sequence[ClientReport]) -> dict[str, float]:
        parts = [r.parts.of(self) for r in reports]
        m = {"editing/edited_tensors": sum(len(p.edited) for p in parts)}
        sims = [v for p in parts for v in p.similarities.values()]
        if sims:
            m["editing/similarity_mean"] = float(np.mean(sims))
            m["editing/similarity_min"] = float(np.min(sims))
        return m

    def figures(self, clients: Sequence[Sequence[dict]]) -> dict[str, Any]:
        sims = [r["min_similarity"] for rows in clients for r in rows if "min_similarity" in r]
        sims = [s for s in sims if s == s]  # NaN: nothing was compared
        if not sims:
            return {}
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(sims, bins=30)
        ax.set_xlabel("lowest cosine similarity to the global adapter, per client update")
        ax.set_ylabel("client updates")
        fig.tight_layout()
        return {"plots/editing_similarity.png": fig}

    def client_columns(self, report: ClientReport) -> dict[str, Any]:
        part = report.parts.of(self)
        return {
            "edited_tensors": len(part.edited),
            "min_similarity": min(part.similarities.values(), default=float("nan")),
        }
