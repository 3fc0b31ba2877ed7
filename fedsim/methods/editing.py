"""FediLoRA's layer-wise model editing (docs/algorithms.md §1.3), on the client after local
training.

From round 2 on, a client compares each of its shared tensors with the global one it received
and pulls the least similar ``editing.count`` of them (cosine below ``editing.threshold``)
toward the global value. The math is :func:`aggregation.edit_layerwise`.

``editing.enabled`` is ``auto`` (the default), ``true`` or ``false``. ``auto`` turns editing on
only with ``aggregation.method=fedilora`` (or ``fedilora_damped``) and only where it can
apply (there is a global adapter, and ``editing.key`` names tensors the clients share), so
every other merge method runs as itself; ``true`` asks for editing with any merge method
and is an error where it cannot apply. :func:`editing_on` is the one answer to "does this
run edit?".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from aggregation import edit_layerwise
from fedsim.errors import ConfigError
from fedsim.messages import ClientReport
from fedsim.methods.base import ClientStep, Method, configured_merger

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


@dataclass
class EditReport:
    """What editing did to one client's update."""

    edited: list[str]
    similarities: dict[str, float]


# editing.enabled: the values it takes (auto: see editing_on)
ENABLED_VALUES: tuple[str | bool, ...] = ("auto", True, False)


def _enabled_value(cfg: FedSimConfig) -> str | bool:
    """``editing.enabled``, checked: ``auto``, ``True`` or ``False`` (never ``1`` or ``"yes"``,
    which a config built in Python could hold)."""
    value = cfg.editing.enabled
    if isinstance(value, bool) or (isinstance(value, str) and value == "auto"):
        return value
    allowed = ", ".join(str(v).lower() for v in ENABLED_VALUES)
    raise ConfigError("editing.enabled", f"must be one of {allowed}; got {value!r}")


def _cannot_apply(cfg: FedSimConfig) -> ConfigError | None:
    """Why editing cannot apply under ``cfg`` (the error ``editing.enabled=true`` raises), or
    None where it can."""
    merger = configured_merger(cfg)
    policy = cfg.sharing.policy
    fresh = merger is not None and merger.fresh_adapter_each_round
    if fresh or policy == "none":
        without = f"aggregation.method={cfg.aggregation.method}" if fresh else "sharing.policy=none"
        return ConfigError(
            "editing.enabled",
            "layer-wise editing compares a client's adapter with the global one it "
            f"received, which does not exist with {without}; set editing.enabled=auto or false",
        )
    private = {"B": "lora_A", "A": "lora_B"}.get(policy)
    if cfg.editing.key == private:
        return ConfigError(
            "editing.key",
            f"editing.key={cfg.editing.key} edits tensors that sharing.policy={policy} "
            "keeps private (there is no global version to compare with); use the shared "
            "part or all",
        )
    return None


EDITING_MERGES = ("fedilora", "fedilora_damped")  # the merges editing=auto pairs with


def editing_on(cfg: FedSimConfig) -> bool:
    """Whether FediLoRA's layer-wise editing runs under ``cfg`` (the effective value of
    ``editing.enabled``).

    ``true`` and ``false`` mean what they say (``true`` where editing cannot apply is a
    :class:`ConfigError` at load, from :meth:`Editing.check`). ``auto`` is on only with
    ``aggregation.method=fedilora`` (or its damped variant ``fedilora_damped``) and where
    editing can apply: a global adapter exists
    (``sharing.policy`` is not ``none``) and ``editing.key`` is not a tensor the sharing policy
    keeps private; otherwise off, without error.

    Raises:
        ConfigError: ``editing.enabled`` holds another value.
    """
    value = _enabled_value(cfg)
    if value != "auto":
        return value
    return cfg.aggregation.method in EDITING_MERGES and _cannot_apply(cfg) is None


class Editing(Method):
    """FediLoRA's layer-wise editing: on where :func:`editing_on` says so."""

    name: ClassVar[str] = "editing"
    order: ClassVar[int] = 50

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return editing_on(cfg)

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        e = cfg.editing
        if e.count < 1:
            raise ConfigError("editing.count", f"must be >= 1, got {e.count}")
        if not 0 <= e.threshold <= 1.0 + 1e-9:
            raise ConfigError("editing.threshold", "must be in [0, 1]")
        if _enabled_value(cfg) is not True:  # false; auto is off wherever it cannot apply
            return
        error = _cannot_apply(cfg)
        if error is not None:
            raise error

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
