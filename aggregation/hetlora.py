"""HetLoRA (docs/algorithms.md §1.4, Cho et al. 2024): zero-pad, then weight clients by update norm.

``w_i ∝ n_i * sum_modules ||B_i @ A_i||_F``, normalised to sum 1 (``p_i`` if every norm is 0);
``A_g = sum_i w_i pad(A_i)``, ``B_g = sum_i w_i pad(B_i)``; dense keys keep ``p_i``.
Redistribution truncates. ``hetlora_tail_norm`` is the optional self-pruning regulariser a
client adds to its loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from aggregation.lora_keys import rank_axis
from aggregation.pairs import a_matrix, b_matrix, lora_pairs
from aggregation.rank_merger import RankMerger
from aggregation.stacking import (
    accumulation_dtype,
    restore_rank_axis,
    sample_weights,
    stack_rank_first,
    weighted_average,
    weighted_rank_sum,
)
from aggregation.streaming import PaddedStream, StreamingMerge
from aggregation.validate import check_merge_arguments, check_merge_inputs


def product_norm(state: Mapping[str, Tensor]) -> float:
    """Return ``sum over modules of ||B @ A||_F`` for one adapter, without forming ``B @ A``.

    ``||B A||_F^2 = sum((A A^T) * (B^T B))`` needs two ``r x r`` Gram matrices instead of the
    ``d x k`` product, which matters for large projections.

    Args:
        state: A LoRA state dict whose factors come in pairs.

    Returns:
        The summed Frobenius norms, as a Python float.

    Raises:
        ValueError: If a factor has no partner or a ``lora_B`` is badly shaped.
    """
    total = 0.0
    for a_key, b_key in lora_pairs(state).values():
        dtype = accumulation_dtype([state[a_key], state[b_key]])
        a = a_matrix(state[a_key]).to(dtype)  # (r, k')
        b = b_matrix(state[b_key]).to(dtype)  # (d, r)
        squared = ((a @ a.T) * (b.T @ b)).sum()
        total += float(squared.clamp(min=0).sqrt())
    return total


def hetlora_weights(states: Sequence[Mapping[str, Tensor]], num_samples: Sequence[float]) -> Tensor:
    """Compute HetLoRA's client weights ``w_i ∝ n_i * sum_modules ||B_i A_i||_F``.

    Args:
        states: The clients' LoRA state dicts.
        num_samples: Each client's number of training samples (positive).

    Returns:
        A float64 vector of shape ``(|S|,)`` summing to 1; ``p_i = n_i / sum n`` when every
        client's update is zero (the norms carry no information then).

    Raises:
        ValueError: If the lengths differ or a factor has no partner.
    """
    if len(states) != len(num_samples):
        raise ValueError(f"got {len(states)} states and {len(num_samples)} sample counts")
    norms = torch.tensor([product_norm(state) for state in states], dtype=torch.float64)
    mass = torch.as_tensor(num_samples, dtype=torch.float64) * norms
    total = mass.sum()
    if not bool(total > 0):
        return sample_weights(num_samples)
    return mass / total


def _norm_weight(state: Mapping[str, Tensor], num_samples: float) -> float:
    """HetLoRA's unnormalised weight of one client, ``n_i * sum_modules ||B_i A_i||_F``.

    Args:
        state: The client's LoRA state dict.
        num_samples: The client's number of training samples.

    Returns:
        The weight, as a Python float (0 when the client's update is zero).

    Raises:
        ValueError: If a factor has no partner.
    """
    return float(num_samples) * product_norm(state)


def hetlora_merge(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    *,
    global_rank: int | None = None,
) -> dict[str, Tensor]:
    """Merge clients by zero-padding to ``R`` and averaging with HetLoRA's norm weights.

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        global_rank: The global rank ``R``; defaults to ``max(ranks)``.

    Returns:
        A new rank-``R`` state dict, each tensor in the dtype of client 0's tensor. LoRA keys
        use ``hetlora_weights``, dense keys ``p_i``.

    Raises:
        ValueError: If the inputs are inconsistent (see ``check_merge_inputs``) or a factor
            has no partner.
    """
    check_merge_arguments(states, ranks, num_samples, global_rank)
    rank = global_rank if global_rank is not None else max(ranks, default=0)
    check_merge_inputs(states, ranks, num_samples, rank)
    norm_weights = hetlora_weights(states, num_samples)
    weights = norm_weights[:, None].expand(len(states), rank)  # (|S|, R), same for every j
    client_weights = sample_weights(num_samples)
    merged: dict[str, Tensor] = {}
    for key in states[0]:
        tensors = [state[key] for state in states]
        if rank_axis(key) is None:
            merged[key] = weighted_average(tensors, client_weights)
            continue
        stacked = stack_rank_first(key, tensors, rank, accumulation_dtype(tensors))
        combined = weighted_rank_sum(stacked, weights)  # (R, *rest)
        merged[key] = restore_rank_axis(key, combined).to(tensors[0].dtype)
    return merged


def hetlora_tail_norm(state: Mapping[str, Tensor], delta: int) -> Tensor:
    """HetLoRA's self-pruning term: ``sum over modules of ||B[:, r-δ:r] @ A[r-δ:r, :]||_F``.

    Differentiable in the factors, so a client adds ``gamma * hetlora_tail_norm(...)`` to its
    local loss; when the term falls below a threshold the client may drop its last ``δ``
    dimensions. The product is formed explicitly (``d x k`` per module) because the Gram-matrix
    shortcut of ``product_norm`` has an infinite gradient at zero.

    Args:
        state: The client's LoRA state dict (tensors may require grad).
        delta: The number of tail dimensions ``δ``, ``1 <= δ <= r``.

    Returns:
        A scalar tensor in float32 (float64 if the factors are), on the factors' device.

    Raises:
        ValueError: If ``state`` has no LoRA pair, a factor has no partner, or ``delta`` is
            outside ``[1, r]`` for some module.
    """
    pairs = lora_pairs(state)
    if not pairs:
        raise ValueError("state has no lora_A/lora_B pair")
    terms = []
    for a_key, b_key in pairs.values():
        dtype = accumulation_dtype([state[a_key], state[b_key]])
        a = a_matrix(state[a_key]).to(dtype)  # (r, k')
        b = b_matrix(state[b_key]).to(dtype)  # (d, r)
        rank = a.shape[0]
        if not 1 <= delta <= rank:
            raise ValueError(f"{a_key}: delta must be in [1, {rank}], got {delta}")
        tail = b[:, rank - delta :] @ a[rank - delta :]  # (d, k')
        terms.append(torch.linalg.matrix_norm(tail, ord="fro"))
    return torch.stack(terms).sum()


class HetLoRAMerger(RankMerger):
    """HetLoRA (docs/algorithms.md §1.4): zero-padding with weights ``∝ n_i * ||B_i A_i||_F``."""

    name: ClassVar[str] = "hetlora"
    needs_pairs: ClassVar[bool] = True
    linear_in_factors: ClassVar[bool] = True
    streams: ClassVar[bool] = True
    dp_refusal: ClassVar[str] = (
        "HetLoRA weights each client by the norm of its update, so one client moves every "
        "client's weight and the merge's sensitivity is not bounded by privacy.clip_norm"
    )

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return hetlora_merge(states, ranks, num_samples, global_rank=global_rank)

    def _open_stream(
        self,
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
        template: Mapping[str, Tensor],
    ) -> StreamingMerge:
        lora_pairs(template)  # every factor needs its partner for the norms
        # The norm is the client's own, so its weight is known on arrival; when every norm
        # is 0 the stream falls back to n_i, as hetlora_weights does.
        return PaddedStream(template, global_rank, weight=_norm_weight)

    def client_weight(self, state: Mapping[str, Tensor], num_samples: float) -> float:
        """HetLoRA's ``n_i * sum_modules ||B_i A_i||_F``."""
        return _norm_weight(state, num_samples)
