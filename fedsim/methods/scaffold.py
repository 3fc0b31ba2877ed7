"""SCAFFOLD (docs/algorithms.md §3.3): control variates that correct each client's drift.

A client corrects its local gradient to ``g - c_i + c`` and uploads ``c_i+ - c_i``; the server
updates ``c`` after each merge. The math is :mod:`aggregation.scaffold`; this module carries
the variates through the round: the server's ``c`` in the broadcast, the client's ``c_i`` in
its persistent state, the deltas in the uploads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from aggregation import scaffold_client_variate, scaffold_server_variate, truncate
from fedsim.errors import ConfigError
from fedsim.messages import nbytes
from fedsim.methods.base import (
    ClientStep,
    MergeBatch,
    ObjectiveMethod,
    Params,
    ServerContext,
    check_weighted_sum_merge,
)

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


class Scaffold(ObjectiveMethod):
    """``objective.method=scaffold``."""

    name: ClassVar[str] = "scaffold"
    order: ClassVar[int] = 22
    leading_dimensions: ClassVar[bool] = True

    @classmethod
    def dp_conflict(cls, cfg: FedSimConfig) -> str | None:
        return (
            "objective.method=scaffold uploads the control variates c_i+ - c_i beside the "
            "update; they leave the client unclipped and unnoised"
        )

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        if not cls.enabled(cfg):
            return
        check_weighted_sum_merge(cfg, "objective.method", cls.name)
        if cfg.train.optimizer != "sgd":
            raise ConfigError(
                "train.optimizer",
                "objective.method=scaffold derives its control variates for SGD; set "
                "train.optimizer=sgd",
            )
        if cfg.lora.scaling != "constant":
            raise ConfigError(
                "lora.scaling",
                "objective.method=scaffold needs lora.scaling=constant: with per-rank scaling "
                "the clients' B tensors live in different spaces and their control variates "
                "cannot be averaged",
            )

    # -- client ---------------------------------------------------------------------------
    def before_training(self, step: ClientStep) -> None:
        rank = step.task.rank
        c_view = truncate(step.broadcast.parts.of(self), rank)
        c_i = step.state.parts.of(self)
        # a pruned client keeps the leading dimensions; a new one starts from zero
        c_i = truncate(c_i, rank) if c_i else {k: torch.zeros_like(v) for k, v in c_view.items()}
        correction = {k: (c_view[k] - c_i[k]).detach() for k in c_view}
        step.objective.corrections.append(lambda params: _correct(params, correction))
        step.download_bytes += nbytes(c_view)
        step.memo[self.name] = (c_view, c_i)

    def after_training(self, step: ClientStep) -> None:
        c_view, c_i = step.memo.of(self)
        c_new = scaffold_client_variate(
            c_i,
            c_view,
            {k: step.start[k] for k in c_view},
            {k: step.local[k] for k in c_view},
            step.steps,
            self.cfg.train.lr,
        )
        step.upload[self.name] = {k: c_new[k] - c_i[k] for k in c_new}
        step.new_state[self.name] = c_new

    # -- server ---------------------------------------------------------------------------
    def bind_server(self, server: ServerContext) -> None:
        super().bind_server(server)
        self.c = {k: torch.zeros_like(server.template[k]) for k in server.shared}

    def broadcast_part(self) -> dict:
        return self.c

    def after_apply(self, batch: MergeBatch) -> None:
        self.c = scaffold_server_variate(
            self.c,
            [u.parts.of(self) for u in batch.uploads],
            batch.ranks,
            self.server.num_clients,
            self.server.global_rank,
        )

    def state_dict(self) -> dict:
        return {"c": self.c}

    def load_state_dict(self, state: dict) -> None:
        self.c = state["c"]


def _correct(params: Params, correction: dict) -> None:
    for k, corr in correction.items():
        p = params.get(k)
        if p is not None and p.grad is not None:
            p.grad.add_(corr.to(p.grad.device))
