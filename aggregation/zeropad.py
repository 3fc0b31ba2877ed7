"""Zero-padding FedAvg (docs/algorithms.md §1.1): pad every client to the global rank, then average.

Dimension ``j`` is divided by the weight of all clients although only clients with
``r_i >= j`` trained it, so high dimensions shrink by their covered weight share every round
("dilution"). This is the baseline FediLoRA's reweighting corrects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Tensor

from aggregation.lora_keys import rank_axis
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


def zeropad_merge(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    *,
    global_rank: int | None = None,
) -> dict[str, Tensor]:
    """Merge clients by zero-padding to ``R`` and averaging with ``p_i = n_i / sum n``.

    ``A_g = sum_i p_i pad(A_i)``, ``B_g = sum_i p_i pad(B_i)``; dense tensors are averaged with
    the same ``p_i``.

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        global_rank: The global rank ``R``; defaults to ``max(ranks)``. Dimensions no client
            covers are zero.

    Returns:
        A new rank-``R`` state dict, each tensor in the dtype of client 0's tensor.

    Raises:
        ValueError: If the inputs are inconsistent (see ``check_merge_inputs``).
    """
    check_merge_arguments(states, ranks, num_samples, global_rank)
    rank = global_rank if global_rank is not None else max(ranks, default=0)
    check_merge_inputs(states, ranks, num_samples, rank)
    client_weights = sample_weights(num_samples)
    weights = client_weights[:, None].expand(len(states), rank)  # (|S|, R), same for every j
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


class ZeroPadMerger(RankMerger):
    """Zero-padding FedAvg (docs/algorithms.md §1.1), the baseline that dilutes high dimensions."""

    name: ClassVar[str] = "zeropad"
    linear_in_factors: ClassVar[bool] = True
    streams: ClassVar[bool] = True
    dp_weights: ClassVar[str | None] = "samples"

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return zeropad_merge(states, ranks, num_samples, global_rank=global_rank)

    def _open_stream(
        self,
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
        template: Mapping[str, Tensor],
    ) -> StreamingMerge:
        # acc[:r_i] += n_i * x_i, divided by sum n at the end.
        return PaddedStream(template, global_rank)
