"""FediLoRA dimension-wise reweighting (docs/algorithms.md §1.2): each dimension averages its
coverers.

For dimension ``j`` let ``C_j = {i : r_i >= j}``; then ``w_ij = n_i / sum_{l in C_j} n_l`` for
``i in C_j`` (else 0), ``A_g[j] = sum_i w_ij A_i[j]`` and ``B_g[:, j] = sum_i w_ij B_i[:, j]``.
With equal ranks this is FedAvg. A dimension no sampled client covers keeps its previous global
value (``empty_dim="keep"``) or is zeroed (``"zero"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from aggregation.lora_keys import default_global_rank, rank_axis
from aggregation.rank_merger import RankMerger
from aggregation.stacking import (
    accumulation_dtype,
    restore_rank_axis,
    sample_weights,
    stack_rank_first,
    weighted_average,
    weighted_rank_sum,
)
from aggregation.streaming import DimensionStream, StreamingMerge
from aggregation.validate import check_merge_arguments, check_merge_inputs

EmptyDim = Literal["keep", "zero"]
EMPTY_DIM_CHOICES: tuple[str, ...] = get_args(EmptyDim)


def dimension_weights(
    ranks: Sequence[int],
    num_samples: Sequence[float],
    global_rank: int,
    covers: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Build FediLoRA's ``|S| x R`` weight matrix and the mask of covered dimensions.

    Args:
        ranks: Each client's rank ``r_i``.
        num_samples: Each client's sample count ``n_i`` (positive).
        global_rank: The global rank ``R``.
        covers: ``(|S|, R)`` bool, the dimensions each client holds when they are not its
            leading ``r_i`` (Fed-PLoRA's modules, docs/algorithms.md §6.3: the weights are
            then its (6.3.3)); None: client ``i`` holds ``j < r_i``.

    Returns:
        ``(weights, covered)``: float64 ``weights[i, j] = w_ij`` of shape ``(|S|, R)`` whose
        covered columns sum to 1 and uncovered columns are 0, and bool ``covered`` of shape
        ``(R,)``, true where some client holds ``j`` (0-based; ``r_i > j`` by default).
    """
    counts = torch.as_tensor(num_samples, dtype=torch.float64)
    if covers is None:
        client_ranks = torch.as_tensor(ranks, dtype=torch.long)
        covers = torch.arange(global_rank)[None, :] < client_ranks[:, None]  # (|S|, R)
    mass = counts[:, None] * covers  # (|S|, R): n_i where client i covers j
    totals = mass.sum(dim=0)  # (R,)
    covered = totals > 0
    weights = mass / torch.where(covered, totals, torch.ones_like(totals))
    return weights, covered


def fedilora_merge(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    *,
    previous: Mapping[str, Tensor] | None = None,
    global_rank: int | None = None,
    empty_dim: EmptyDim = "keep",
) -> dict[str, Tensor]:
    """Merge clients with FediLoRA's per-dimension weights; dense tensors use ``p_i``.

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        previous: The previous global state (any rank up to ``R``; missing dimensions count
            as zero). Used only for dimensions no client covers, under ``empty_dim="keep"``;
            when it is None such dimensions are zero.
        global_rank: The global rank ``R``; defaults to ``max(ranks)``, or the rank of
            ``previous`` if larger.
        empty_dim: ``"keep"`` an uncovered dimension's previous value, or ``"zero"`` it.

    Returns:
        A new rank-``R`` state dict, each tensor in the dtype of client 0's tensor.

    Raises:
        ValueError: If ``empty_dim`` is not a valid choice or the inputs are inconsistent (see
            ``check_merge_inputs``).
    """
    if empty_dim not in EMPTY_DIM_CHOICES:
        raise ValueError(f"empty_dim must be one of {EMPTY_DIM_CHOICES}, got {empty_dim!r}")
    check_merge_arguments(states, ranks, num_samples, global_rank)
    rank = global_rank if global_rank is not None else default_global_rank(ranks, previous)
    check_merge_inputs(states, ranks, num_samples, rank, previous)
    weights, covered = dimension_weights(ranks, num_samples, rank)
    uncovered = ~covered
    # Only an uncovered dimension reads ``previous``; without one it is never touched.
    kept = previous if empty_dim == "keep" and bool(uncovered.any()) else None
    client_weights = sample_weights(num_samples)
    merged: dict[str, Tensor] = {}
    for key in states[0]:
        tensors = [state[key] for state in states]
        if rank_axis(key) is None:
            merged[key] = weighted_average(tensors, client_weights)
            continue
        dtype = accumulation_dtype(tensors)
        stacked = stack_rank_first(key, tensors, rank, dtype)  # (|S|, R, *rest)
        combined = weighted_rank_sum(stacked, weights)  # (R, *rest); uncovered rows are 0
        if kept is not None:
            old = stack_rank_first(key, [kept[key]], rank, dtype)[0]  # (R, *rest), zero-padded
            mask = uncovered.to(combined.device)
            combined[mask] = old[mask]
        merged[key] = restore_rank_axis(key, combined).to(tensors[0].dtype)
    return merged


class FediLoRAMerger(RankMerger):
    """FediLoRA dimension-wise reweighting (docs/algorithms.md §1.2).

    Args:
        empty_dim: What an uncovered dimension becomes: ``"keep"`` its previous global value,
            or ``"zero"``.

    Raises:
        ValueError: If ``empty_dim`` is not a valid choice.
    """

    name: ClassVar[str] = "fedilora"
    options: ClassVar[tuple[str, ...]] = ("empty_dim",)
    linear_in_factors: ClassVar[bool] = True
    streams: ClassVar[bool] = True
    dp_weights: ClassVar[str | None] = "coverers"

    def __init__(self, empty_dim: EmptyDim = "keep") -> None:
        if empty_dim not in EMPTY_DIM_CHOICES:
            raise ValueError(f"empty_dim must be one of {EMPTY_DIM_CHOICES}, got {empty_dim!r}")
        self.empty_dim: EmptyDim = empty_dim

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return fedilora_merge(
            states,
            ranks,
            num_samples,
            previous=previous,
            global_rank=global_rank,
            empty_dim=self.empty_dim,
        )

    def _open_stream(
        self,
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
        template: Mapping[str, Tensor],
    ) -> StreamingMerge:
        fill = previous if self.empty_dim == "keep" else None
        return DimensionStream(template, global_rank, fill=fill)

    def dimension_weights(
        self,
        ranks: Sequence[int],
        num_samples: Sequence[float],
        client_weights: Sequence[float],
        global_rank: int,
        covers: Tensor | None = None,
    ) -> Tensor:
        """FediLoRA's ``w_ij = n_i / W_j`` over the clients holding ``j`` (see
        :func:`dimension_weights`)."""
        return dimension_weights(ranks, num_samples, global_rank, covers)[0]
