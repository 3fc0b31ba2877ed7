"""FedEx-LoRA (docs/algorithms.md §1.7; Singhal et al., arXiv 2410.09432): exact aggregation.

Averaging LoRA factors is not averaging the clients' updates: ``mean(B) mean(A)`` misses the
cross terms of ``mean(B_i A_i)``. FedEx-LoRA keeps the factor average as the global adapter and
folds the residual ``sum_i p_i B_i A_i - B_g A_g`` into every client's frozen base weights, so
the global model is exactly the sample-weighted average of the clients' models. The residual
is :func:`aggregation.fedex_residual`; the paper averages factors with zero-padding FedAvg,
and any merge that outputs factors of a fixed rank composes the same way (FediLoRA's
dimension-wise merge, HetLoRA, FlexLoRA's and raFLoRA's truncated SVDs: the residual restores
what the merge left out). The price: every round's clients download a dense ``d x k``
residual per module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from aggregation import fedex_residual
from fedsim.errors import ConfigError
from fedsim.messages import ExportedAdapter, State, nbytes
from fedsim.methods.base import MergeBatch, Method, configured_merger

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


class FedEx(Method):
    """``fedex.enabled=true``."""

    name: ClassVar[str] = "fedex"
    order: ClassVar[int] = 42
    folds_base: ClassVar[bool] = True

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.fedex.enabled

    @classmethod
    def dp_conflict(cls, cfg: FedSimConfig) -> str | None:
        return (
            "fedex.enabled folds the residual sum_i p_i B_i A_i - B_g A_g into the base "
            "weights; that residual carries the clients' factors unclipped and unnoised"
        )

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        if not cfg.fedex.enabled:
            return
        merger = configured_merger(cfg)
        if merger is not None and not merger.fixed_rank:
            from aggregation.registry import MERGERS, merger_class

            fixed = [name for name in MERGERS if merger_class(name).fixed_rank]
            raise ConfigError(
                "fedex.enabled",
                f"aggregation.method={cfg.aggregation.method} is exact already: its stacked "
                "product is the weighted sum of the clients' products and it folds that into "
                "the base weights itself, so FedEx-LoRA's residual would be zero; use "
                + ", ".join(fixed[:-1])
                + f" or {fixed[-1]}",
            )
        if cfg.sharing.policy != "all":
            raise ConfigError(
                "fedex.enabled",
                f"FedEx-LoRA needs both factors of every client's modules on the server to "
                f"form B_i A_i, but sharing.policy={cfg.sharing.policy} keeps "
                + ("everything" if cfg.sharing.policy == "none" else "one of them")
                + " on the clients; use sharing.policy=all",
            )
        if cfg.server.optimizer != "fedavg":
            raise ConfigError(
                "fedex.enabled",
                f"FedEx-LoRA makes the global model the exact average of the clients' models; "
                f"server.optimizer={cfg.server.optimizer} would step the factors away from the "
                "average the folded residual completes; use server.optimizer=fedavg",
            )

    def after_merge(self, batch: MergeBatch, merged: State) -> State:
        residual = fedex_residual(batch.updates, batch.ranks, batch.num_samples, merged)
        self.server.base.add(residual, nbytes(residual))
        return merged

    def export(self, adapter: ExportedAdapter) -> ExportedAdapter:
        base = self.server.base.delta
        return ExportedAdapter(adapter.adapter, adapter.rank, base=base)
