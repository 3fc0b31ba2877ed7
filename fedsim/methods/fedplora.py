"""Fed-PLoRA (docs/algorithms.md §6.3, arXiv 2602.16936): parallel one-rank modules.

The global adapter is ``R`` one-rank modules ``(b_j, a_j)``. Each round a client of rank ``r_i``
trains the ``r_i`` modules ``K_i`` (:func:`aggregation.fedplora.module_indices`: seeded by
(seed, round, client), so a retry, another actor or a resumed run draws the same set) from
their global values, with every other module folded into its frozen weights
(:meth:`FedPLoRA.fold_into_base`), so its model before training is the global model exactly.
It uploads those modules with their indices; the server averages each module over the clients
that trained it (:func:`aggregation.fedplora.fedplora_merge`), which replaces the LoRA factors
of the configured merge. That merge must average each rank dimension over the clients that
cover it (FediLoRA's, ``RankMerger.dp_weights == "coverers"``): Fed-PLoRA is that rule with a
client covering ``K_i`` instead of ``0..r_i-1``. With ``fedplora.rule=first`` the two are the
same, so the merge's result stands and every method that reads a client's dimensions as the
leading ones composes.

The price: every client downloads all ``R`` modules (those it trains and those it folds).

The merge diagnostics (docs/algorithms.md §1.9) learn each upload's ``K_i`` from
:meth:`FedPLoRA.upload_dimensions` and count each module for the clients that trained it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from aggregation import is_lora, lora_rank, unfold_scaling
from aggregation.fedplora import (
    complement,
    fedplora_merge,
    folded_delta,
    module_indices,
    select_modules,
)
from fedsim.errors import ConfigError
from fedsim.messages import Broadcast, ClientTask, State, Upload, nbytes
from fedsim.methods.base import ClientStep, MergeBatch, Method, configured_merger
from fedsim.models.scaling import client_scaling

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


class FedPLoRA(Method):
    """``fedplora.enabled=true``."""

    name: ClassVar[str] = "fedplora"
    order: ClassVar[int] = 43  # server: after the robust rules, DP and FedNova; before editing

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.fedplora.enabled

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        if not cfg.fedplora.enabled:
            return
        from fedsim.config.registry import method_classes

        merger = configured_merger(cfg)
        if merger is not None and merger.dp_weights != "coverers":
            raise ConfigError(
                "fedplora.enabled",
                "Fed-PLoRA's server rule averages each one-rank module over the clients that "
                "trained it and replaces the merge's factors with that average; it generalises "
                "a merge that averages each rank dimension over the clients covering it, not "
                f"aggregation.method={cfg.aggregation.method}; use aggregation.method=fedilora",
            )
        if cfg.sharing.policy != "all":
            raise ConfigError(
                "fedplora.enabled",
                "a Fed-PLoRA client folds b_j a_j of every module it does not train and the "
                "server averages both factors of every trained module, but "
                f"sharing.policy={cfg.sharing.policy} keeps "
                + ("everything" if cfg.sharing.policy == "none" else "one factor")
                + " on the clients; use sharing.policy=all",
            )
        for method in method_classes():
            if method.folds_base and method.enabled(cfg):
                raise ConfigError(
                    "fedplora.enabled",
                    f"{method.name} folds updates into the shared base weights on the premise "
                    "that a client's model is that base plus its own adapter, but a Fed-PLoRA "
                    "client's frozen weights also hold the global modules it does not train; "
                    f"turn {method.name} off",
                )
        if cfg.fedplora.rule != "random":
            return
        for method in method_classes():
            if method.leading_dimensions and method.enabled(cfg):
                raise ConfigError(
                    "fedplora.rule",
                    f"{method.name} takes a rank-r client's dimensions to be the first r "
                    "dimensions of the global adapter, but under fedplora.rule=random the "
                    "client trains r modules drawn anywhere among the R; use "
                    f"fedplora.rule=first or turn {method.name} off",
                )
        if cfg.faults.attack == "lie_about_rank":
            raise ConfigError(
                "fedplora.rule",
                "faults.attack=lie_about_rank pads or cuts the upload to the claimed rank, and "
                "under fedplora.rule=random a padded dimension names no module; use "
                "fedplora.rule=first or another faults.attack",
            )

    @classmethod
    def dp_conflict(cls, cfg: FedSimConfig) -> str | None:
        if cfg.fedplora.rule == "first":
            return None  # the merge's noised result stands (see after_merge)
        return (
            "fedplora.rule=random replaces the noised merge with its own per-module average; "
            "use fedplora.rule=first"
        )

    # -- client ---------------------------------------------------------------------------
    def modules(self, task: ClientTask, broadcast: Broadcast) -> list[int]:
        """The modules ``K_i`` the task's client trains this round."""
        rule = self.cfg.fedplora.rule
        global_rank = lora_rank(broadcast.adapter)
        return module_indices(
            rule, task.rank, global_rank, self.cfg.seed, task.round_idx, task.client_id
        )

    def receive(self, task: ClientTask, broadcast: Broadcast, view: State) -> State:
        """The modules ``K_i`` of the global adapter (with the view's dense keys), in the
        client's LoRA scaling."""
        chosen = select_modules(_lora(broadcast.adapter), self.modules(task, broadcast))
        start = {**view, **chosen}
        scaling = client_scaling(self.cfg.lora, task.rank, lora_rank(broadcast.adapter))
        return unfold_scaling({k: start[k] for k in view}, scaling)

    def fold_into_base(self, task: ClientTask, broadcast: Broadcast) -> State | None:
        """``sum_{j not in K_i} b_j a_j`` per module, from the global adapter."""
        return folded_delta(broadcast.adapter, self.modules(task, broadcast)) or None

    def before_training(self, step: ClientStep) -> None:
        chosen = self.modules(step.task, step.broadcast)
        rest = complement(chosen, lora_rank(step.broadcast.adapter))
        if rest:  # the folded modules come down with the ones it trains
            step.download_bytes += nbytes(select_modules(_lora(step.broadcast.adapter), rest))
        step.upload[self.name] = {"indices": torch.tensor(chosen, dtype=torch.int64)}

    # -- server ---------------------------------------------------------------------------
    def upload_dimensions(self, upload: Upload) -> list[int] | None:
        """``K_i`` under ``random`` (the merge diagnostics count each module for the clients
        that trained it); None under ``first``, whose modules are the leading dimensions."""
        if self.cfg.fedplora.rule == "first":
            return None
        return upload.parts.of(self)["indices"].tolist()

    def after_merge(self, batch: MergeBatch, merged: State) -> State:
        """Each module's average over the clients that trained it, in place of the merge's
        factors (``first``: the merge's result is that average already)."""
        if self.cfg.fedplora.rule == "first":
            return merged
        indices = [u.parts.of(self)["indices"].tolist() for u in batch.uploads]
        factors = _lora(merged)
        lora = {k: v for k, v in batch.current.items() if k in factors}
        result = fedplora_merge(
            [{k: u[k] for k in lora} for u in batch.updates],
            indices,
            batch.num_samples,
            lora,
            empty_dim=self.cfg.aggregation.empty_dim,
        )
        return {**merged, **result}


def _lora(state: State) -> State:
    return {k: v for k, v in state.items() if is_lora(k)}
