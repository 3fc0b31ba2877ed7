"""FLoRA's base folding (docs/algorithms.md §1.6): the stacked product goes into the frozen weights.

The merge rule (:class:`aggregation.FLoRAMerger`) stacks the clients' factors so that
``B_g A_g = sum_i p_i B_i A_i``. This method folds that product into every client's frozen base
weights and restarts the global adapter from its initial value, so each round's clients train a
fresh LoRA on top of all earlier rounds. The stacked factors of every round are kept: the final
adapter is their concatenation (its product is the sum of the folded updates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from aggregation import flora_delta, lora_rank, truncate
from fedsim.messages import Broadcast, ClientTask, ExportedAdapter, State, nbytes
from fedsim.methods.base import MergeBatch, Method, configured_merger

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig

_FACTORS = ("lora_A.weight", "lora_B.weight")
FRESH_STREAM = 203  # the random stream of the fresh adapters (see actors.client)


class FLoRAFolding(Method):
    """On with ``aggregation.method=flora`` (a merge that hands out a fresh adapter)."""

    name: ClassVar[str] = "flora"
    order: ClassVar[int] = 41
    folds_base: ClassVar[bool] = True

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        merger = configured_merger(cfg)
        return merger is not None and merger.fresh_adapter_each_round

    def receive(self, task: ClientTask, broadcast: Broadcast, view: State) -> State:
        """A fresh LoRA of the client's rank, seeded by (seed, round, client), plus the dense
        keys of the view (the merge hands back only those)."""
        from fedsim.models.lora import fresh_lora_state

        seq = np.random.SeedSequence([self.cfg.seed, FRESH_STREAM, task.round_idx, task.client_id])
        gen = torch.Generator().manual_seed(int(seq.generate_state(1)[0]))
        # The broadcast adapter's rank-r view gives the shapes; no copy off the model.
        template = truncate(broadcast.adapter, task.rank)
        return {**fresh_lora_state(template, gen), **view}

    after_merge_streams = True  # it reads only the merged adapter

    def after_merge(self, batch: MergeBatch, merged: State) -> State:
        lora = {k: v for k, v in merged.items() if k.endswith(_FACTORS)}
        self.stacked.append(lora)
        self.server.base.add(flora_delta(lora), nbytes(lora))
        dense = {k: v for k, v in merged.items() if k not in lora}
        return {**{k: self.server.template[k] for k in lora}, **dense}

    def bind_server(self, server) -> None:
        super().bind_server(server)
        self.stacked: list[State] = []

    def export(self, adapter: ExportedAdapter) -> ExportedAdapter:
        if not self.stacked:
            return adapter
        state = {**adapter.adapter, **concat_stacks(self.stacked)}
        return ExportedAdapter(state, lora_rank(state), base=None)

    def state_dict(self) -> dict:
        return {"stacked": self.stacked}

    def load_state_dict(self, state: dict) -> None:
        self.stacked = list(state.get("stacked") or [])


def concat_stacks(stacks: list[State]) -> State:
    """FLoRA's rounds as one adapter: A rows and B columns concatenated in round order."""
    out = {}
    for k in stacks[0]:
        axis = 0 if k.endswith("lora_A.weight") else 1
        out[k] = torch.cat([s[k] for s in stacks], dim=axis)
    return out
