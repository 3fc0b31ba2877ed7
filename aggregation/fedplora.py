"""Fed-PLoRA's parallel one-rank modules (docs/algorithms.md §6.3, arXiv 2602.16936).

The global adapter is read as ``R`` one-rank modules: module ``j`` is column ``j`` of ``B``
with row ``j`` of ``A``, so ``B A = sum_j b_j a_j``. Each round client ``i`` trains the modules
of an index set ``K_i`` of size ``r_i`` (:func:`module_indices`), starting from their global
values (:func:`select_modules`), with the other modules folded into its frozen weights
(:func:`folded_delta`), so its model before training is the global model. The server averages
each module over the clients that trained it (:func:`fedplora_merge`); with ``K_i = {0..r_i-1}``
that is FediLoRA's dimension-wise reweighting (§1.2) exactly.

Everything is in the ``s = 1`` space (docs/algorithms.md §0.2): ``B`` carries the LoRA scaling,
so the folded ``sum_{j not in K_i} b_j a_j`` is added to ``W_0`` as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from aggregation.fedilora import EMPTY_DIM_CHOICES, EmptyDim
from aggregation.flora import flora_delta
from aggregation.lora_keys import is_lora, lora_rank, rank_axis
from aggregation.stacking import (
    accumulation_dtype,
    restore_rank_axis,
    sample_weights,
    weighted_average,
    weighted_rank_sum,
)
from aggregation.validate import check_merge_arguments

IndexRule = Literal["random", "first"]
INDEX_RULES: tuple[str, ...] = get_args(IndexRule)
# the random stream of the module draws, (seed, stream, round, client) as every seeded
# per-client draw (fedsim.data.partition.rng_for; actors.client's streams are 201-204)
MODULE_STREAM = 221


def module_indices(
    rule: IndexRule, rank: int, global_rank: int, seed: int, round_idx: int, client_id: int
) -> list[int]:
    """The modules ``K_i`` a rank-``rank`` client trains in round ``round_idx``, ascending.

    Args:
        rule: ``"random"``: ``rank`` of the ``global_rank`` modules drawn without replacement
            from the generator of ``(seed, MODULE_STREAM, round_idx, client_id)``, so the same
            task draws the same set on any actor, on a retry and after a resume; ``"first"``:
            ``0 .. rank-1``.
        rank: The client's rank ``r_i``, in ``[1, global_rank]``.
        global_rank: The number ``R`` of modules of the global adapter.
        seed: The run's seed.
        round_idx: The round (1-based).
        client_id: The client.

    Returns:
        ``r_i`` distinct module indices in ``[0, R)``, sorted.

    Raises:
        ValueError: If ``rule`` is unknown or ``rank`` is outside ``[1, global_rank]``.
    """
    if rule not in INDEX_RULES:
        raise ValueError(f"rule must be one of {INDEX_RULES}, got {rule!r}")
    if not 1 <= rank <= global_rank:
        raise ValueError(f"rank must be in [1, {global_rank}], got {rank}")
    if rule == "first":
        return list(range(rank))
    rng = np.random.default_rng([seed, MODULE_STREAM, round_idx, client_id])
    return sorted(int(j) for j in rng.choice(global_rank, size=rank, replace=False))


def complement(indices: Sequence[int], global_rank: int) -> list[int]:
    """The modules of ``0 .. global_rank-1`` not in ``indices``, ascending."""
    chosen = set(indices)
    return [j for j in range(global_rank) if j not in chosen]


def select_modules(state: Mapping[str, Tensor], indices: Sequence[int]) -> dict[str, Tensor]:
    """The modules ``indices`` of ``state``, in that order: ``A[K]`` and ``B[:, K]``.

    Args:
        state: A LoRA state dict of rank ``R`` (dense keys are copied unchanged).
        indices: Module indices in ``[0, R)``.

    Returns:
        A new state dict of rank ``len(indices)``; its dimension ``p`` is module
        ``indices[p]`` of ``state``.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        axis = rank_axis(key)
        if axis is None:
            out[key] = tensor.clone()
        else:
            index = torch.as_tensor(list(indices), dtype=torch.long, device=tensor.device)
            out[key] = tensor.index_select(axis, index)
    return out


def folded_delta(state: Mapping[str, Tensor], indices: Sequence[int]) -> dict[str, Tensor]:
    """Each module prefix's ``sum_{j not in indices} b_j a_j``: what a client folds into its
    frozen base weight (shaped like it, in the factors' dtype; empty when nothing is left).

    Args:
        state: The rank-``R`` global state dict (``s = 1`` space).
        indices: The modules the client trains.
    """
    lora = {k: v for k, v in state.items() if is_lora(k)}
    if not lora:
        return {}
    rest = complement(indices, lora_rank(lora))
    if not rest:
        return {}
    return flora_delta(select_modules(lora, rest))


def module_weights(
    indices: Sequence[Sequence[int]], num_samples: Sequence[float], global_rank: int
) -> tuple[Tensor, Tensor]:
    """Fed-PLoRA's ``|S| x R`` weights ``n_i / sum_{l in Q_j} n_l`` and the trained modules.

    Args:
        indices: Each client's modules ``K_i``.
        num_samples: Each client's sample count ``n_i`` (positive).
        global_rank: The number ``R`` of modules.

    Returns:
        ``(weights, trained)``: float64 ``weights[i, j]`` (0 where ``j`` is not in ``K_i``;
        the columns of trained modules sum to 1) and bool ``trained[j]``, true when some
        client trained module ``j``.
    """
    holds = torch.zeros(len(indices), global_rank, dtype=torch.bool)
    for i, chosen in enumerate(indices):
        holds[i, torch.as_tensor(list(chosen), dtype=torch.long)] = True
    mass = torch.as_tensor(num_samples, dtype=torch.float64)[:, None] * holds
    totals = mass.sum(dim=0)
    trained = totals > 0
    return mass / torch.where(trained, totals, torch.ones_like(totals)), trained


def _check_indices(
    states: Sequence[Mapping[str, Tensor]], indices: Sequence[Sequence[int]], global_rank: int
) -> None:
    if len(indices) != len(states):
        raise ValueError(f"got {len(indices)} index sets for {len(states)} clients")
    for i, (state, chosen) in enumerate(zip(states, indices)):
        chosen = [int(j) for j in chosen]
        if len(set(chosen)) != len(chosen) or not all(0 <= j < global_rank for j in chosen):
            raise ValueError(
                f"client {i}: module indices {chosen} must be distinct and in [0, {global_rank})"
            )
        for key, tensor in state.items():
            axis = rank_axis(key)
            if axis is not None and tensor.shape[axis] != len(chosen):
                raise ValueError(
                    f"client {i}: {key} has rank {tensor.shape[axis]} but {len(chosen)} "
                    "module indices"
                )


def fedplora_merge(
    states: Sequence[Mapping[str, Tensor]],
    indices: Sequence[Sequence[int]],
    num_samples: Sequence[float],
    previous: Mapping[str, Tensor],
    *,
    empty_dim: EmptyDim = "keep",
) -> dict[str, Tensor]:
    """Average each one-rank module over the clients that trained it.

    ``X_g[j] = sum_{i in Q_j} (n_i / sum_{l in Q_j} n_l) X_i[p_i(j)]`` with
    ``Q_j = {i : j in K_i}`` and ``p_i(j)`` the position of ``j`` in ``K_i`` (``X`` a row of
    ``A`` or a column of ``B``); a module no client trained keeps its ``previous`` value
    (``empty_dim="keep"``) or becomes 0 (``"zero"``). Dense keys are averaged with
    ``p_i = n_i / sum n``.

    Args:
        states: The clients' uploads (same keys, ``s = 1`` space); dimension ``p`` of client
            ``i`` is module ``indices[i][p]``.
        indices: Each client's modules ``K_i`` (distinct, in ``[0, R)``, one per dimension).
        num_samples: Each client's number of training samples.
        previous: The global state the round started from, at rank ``R`` (every key of the
            clients').
        empty_dim: What a module no client trained becomes.

    Returns:
        A new rank-``R`` state dict keyed like ``states[0]``, each tensor in the dtype of
        client 0's.

    Raises:
        ValueError: If the arguments are malformed (see ``check_merge_arguments``), an index
            set does not fit its client's rank or ``R``, or ``empty_dim`` is unknown.
    """
    if empty_dim not in EMPTY_DIM_CHOICES:
        raise ValueError(f"empty_dim must be one of {EMPTY_DIM_CHOICES}, got {empty_dim!r}")
    check_merge_arguments(states, [len(k) for k in indices], num_samples)
    lora_keys = [k for k in states[0] if rank_axis(k) is not None]
    global_rank = int(previous[lora_keys[0]].shape[rank_axis(lora_keys[0])]) if lora_keys else 0
    _check_indices(states, indices, global_rank)
    weights, trained = module_weights(indices, num_samples, global_rank)
    client_weights = sample_weights(num_samples)
    merged: dict[str, Tensor] = {}
    for key in states[0]:
        tensors = [state[key] for state in states]
        axis = rank_axis(key)
        if axis is None:
            merged[key] = weighted_average(tensors, client_weights)
            continue
        dtype = accumulation_dtype(tensors)
        first = tensors[0].movedim(axis, 0)
        block = first.new_zeros((len(tensors), global_rank, *first.shape[1:]), dtype=dtype)
        for i, (tensor, chosen) in enumerate(zip(tensors, indices)):
            rows = torch.as_tensor(list(chosen), dtype=torch.long)
            block[i, rows] = tensor.movedim(axis, 0).to(dtype)
        combined = weighted_rank_sum(block, weights)  # (R, *rest); untrained rows are 0
        if empty_dim == "keep" and not bool(trained.all()):
            old = previous[key].movedim(axis, 0).to(dtype)
            combined[~trained] = old[~trained]
        merged[key] = restore_rank_axis(key, combined).to(tensors[0].dtype)
    return merged
