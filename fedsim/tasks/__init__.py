"""Tasks: what differs between a classifier and a generative model, behind one seam.

A backbone declares its task (``Backbone.task``). The task owns how a batch is built from a
split's rows (tokens, pixels, a missing modality's fill, the loss mask), the loss, and the
evaluation. The client worker, the server and the round loop call these methods and never
branch on the model type:

- ``train_batches(split, batch_size, generator)``: the batches of one local epoch;
- ``loss(model, batch)``: ``(mean loss, samples)`` of one batch;
- ``evaluate(model, split)``: metrics of a model on a split (personalised evaluation);
- ``eval_part(model, split, starts, batch_size)``: a shard of the global evaluation, a picklable
  part whose class knows how to ``combine`` the shards of every actor (in shard order) into the
  metrics and, for generation, a table of example outputs.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from fedsim.data.federated import Split


class EvalPart(Protocol):
    """One shard's evaluation results; ``combine`` turns the shards into metrics."""

    def __len__(self) -> int: ...

    @classmethod
    def combine(cls, parts: list[Any]) -> tuple[dict[str, float], list[dict]]:
        """Metrics (unprefixed names) and example rows of the concatenated shards."""
        ...


class Task(Protocol):
    """The seam between the engine and a model family (see the module docstring)."""

    kind: str

    def train_batches(
        self, split: Split, batch_size: int, generator: np.random.Generator | None
    ) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]: ...

    def evaluate(self, model: torch.nn.Module, split: Split) -> dict[str, float]: ...

    def eval_part(
        self, model: torch.nn.Module, split: Split, starts: np.ndarray, batch_size: int
    ) -> EvalPart: ...


def combine_parts(parts: list[Any]) -> tuple[dict[str, float], list[dict]]:
    """Combine shards (in shard order) with the combiner of their own class.

    Empty shards (a pool with more actors than test batches) are skipped.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no evaluation results: every shard is empty")
    return type(parts[0]).combine(parts)


def build_task(cfg, backbone, dataset, device: torch.device) -> Task:
    """The task the backbone declares (``Backbone.task``, a key of
    :data:`fedsim.config.registry.TASKS`), over ``dataset`` (plain config objects in).

    Raises:
        ValueError: a backbone declares a task that is not registered.
    """
    from fedsim.config.registry import task_class

    return task_class(backbone.task)(cfg, backbone, dataset, device)


__all__ = ["EvalPart", "Task", "build_task", "combine_parts"]
