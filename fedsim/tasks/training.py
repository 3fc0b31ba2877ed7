"""Local training of one client's adapter: a few epochs on its LoRA tensors and dense modules.

The loss comes from the task (:mod:`fedsim.tasks`): cross-entropy of a classifier, or the
language-modelling loss on a generative model's assistant tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainStats:
    """What one local training run did."""

    loss_mean: float
    steps: int
    samples_seen: int


def expected_samples(num_samples: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """The samples one client task trains on: ``epochs`` passes over its ``num_samples`` in
    batches of ``batch_size``, stopped after ``max_steps`` optimiser steps. The round loop
    hands the longest tasks out first, so an actor does not idle while another finishes a
    big client it got last."""
    steps_per_epoch = -(-num_samples // batch_size)  # the last batch may be short
    total = num_samples * epochs
    if max_steps is not None and max_steps < steps_per_epoch * epochs:
        full, rest = divmod(max_steps, steps_per_epoch)
        total = full * num_samples + min(rest * batch_size, num_samples)
    return total


def autocast(precision: str, device: torch.device):
    """An autocast context for ``precision`` (``fp32`` means none)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_local(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    epochs: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
    *,
    num_epochs: int,
    max_steps: int | None,
    lr: float,
    weight_decay: float,
    device: torch.device | None = None,
    optimizer: str = "adamw",
    objective=None,
    named_params: dict[str, torch.nn.Parameter] | None = None,
) -> TrainStats:
    """Train ``params`` of ``model`` on the task's loss.

    Args:
        model: the model whose forward takes a batch's tensors as keywords.
        params: the trainable tensors (the optimiser sees only these).
        epochs: ``epochs(e)`` yields the batches of epoch ``e`` (shuffled by the caller's seed).
        loss_fn: ``loss_fn(model, batch)`` gives the batch's mean loss and its sample count;
            it runs the forward pass (under the task's autocast).
        num_epochs: epochs to run.
        max_steps: stop after this many optimiser steps (None: no cap).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        device: where the model lives (default CPU).
        optimizer: ``adamw`` or ``sgd``.
        objective: a :class:`fedsim.models.layers.ClientObjective` (penalty and gradient hooks).
        named_params: the params by peft state key, handed to the objective's hooks.

    Returns:
        Mean training loss, optimiser steps and samples seen.
    """
    device = device or torch.device("cpu")
    if optimizer == "sgd":
        optimiser = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    else:
        optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    named = named_params or {}
    model.train()
    total, steps, seen = 0.0, 0, 0
    for e in range(num_epochs):
        for batch in epochs(e):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = loss_fn(model, batch)
            total_loss = loss
            if objective is not None:
                extra = objective.penalty(named)
                if extra is not None:
                    total_loss = loss + extra
            optimiser.zero_grad(set_to_none=True)
            total_loss.backward()
            if objective is not None:
                objective.correct(named)
            optimiser.step()
            total += loss.item() * n
            seen += n
            steps += 1
            if max_steps is not None and steps >= max_steps:
                model.eval()
                return TrainStats(total / max(seen, 1), steps, seen)
    model.eval()
    return TrainStats(total / max(seen, 1), steps, seen)
