"""FLoRA stacking (docs/algorithms.md §1.6, Wang et al. 2024): concatenate factors, exact product
sum.

``A_g = concat_rows(p_1 A_1, ..., p_n A_n)`` and ``B_g = concat_cols(B_1, ..., B_n)`` in client
order, so ``B_g @ A_g = sum_i p_i B_i @ A_i`` with no cross terms, at global rank ``sum_i r_i``.
Clients fold that product (``flora_delta``) into their frozen base weights and start a fresh
LoRA of their own rank next round, so the global rank changes every round and the stacked
factors are never handed back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Tensor

from aggregation.lora_keys import is_lora
from aggregation.pairs import factor_product, lora_pairs, stack_factors
from aggregation.rank_merger import RankMerger
from aggregation.stacking import (
    accumulation_dtype,
    sample_weights,
    with_dense_average,
)
from aggregation.streaming import StackedStream, StreamingMerge
from aggregation.validate import check_merge_arguments, check_merge_inputs


def flora_stack(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
) -> dict[str, Tensor]:
    """Stack clients' LoRA factors so that the global product is their weighted sum.

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.

    Returns:
        A new state dict at rank ``sum(ranks)``: ``lora_A`` rows ``sum r_<i`` to ``sum r_<=i``
        are ``p_i A_i`` and the matching ``lora_B`` columns are ``B_i``; dense keys are averaged
        with ``p_i``. Each tensor has the dtype of client 0's tensor.

    Raises:
        ValueError: If a factor has no partner or the inputs are inconsistent (see
            ``check_merge_inputs``).
    """
    check_merge_arguments(states, ranks, num_samples)
    check_merge_inputs(states, ranks, num_samples, sum(ranks))
    weights = sample_weights(num_samples)
    merged: dict[str, Tensor] = {}
    for a_key, b_key in lora_pairs(states[0]).values():
        a_tensors = [state[a_key] for state in states]
        b_tensors = [state[b_key] for state in states]
        dtype = accumulation_dtype([*a_tensors, *b_tensors])
        b_cat, a_cat = stack_factors(a_tensors, b_tensors, weights, dtype)  # (d, Σr), (Σr, k')
        total = a_cat.shape[0]
        merged[a_key] = a_cat.reshape(total, *a_tensors[0].shape[1:]).to(a_tensors[0].dtype)
        merged[b_key] = b_cat.reshape(b_cat.shape[0], total, *b_tensors[0].shape[2:]).to(
            b_tensors[0].dtype
        )
    return with_dense_average(states, merged, weights)


def flora_delta(stacked_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return each module's ``B_g @ A_g``, the update a client folds into its base weight.

    The product is formed in float32 (float64 if the factors are) and cast back to the
    factors' dtype.

    Args:
        stacked_state: A (stacked) LoRA state dict whose factors come in pairs; dense keys
            are ignored.

    Returns:
        A new dict: module prefix (the ``lora_A`` key minus ``lora_A.weight``, e.g.
        ``"...query."``) -> ``dW`` shaped like the base weight, ``(d, k)`` or
        ``(d, k, 1, 1)``.

    Raises:
        ValueError: If a factor has no partner or a ``lora_B`` is badly shaped.
    """
    deltas: dict[str, Tensor] = {}
    for prefix, (a_key, b_key) in lora_pairs(stacked_state).items():
        a, b = stacked_state[a_key], stacked_state[b_key]
        deltas[prefix] = factor_product(a, b, accumulation_dtype([a, b])).to(a.dtype)
    return deltas


class FLoRAMerger(RankMerger):
    """FLoRA stacking (docs/algorithms.md §1.6): global rank ``sum_i r_i``, a fresh LoRA every
    round."""

    name: ClassVar[str] = "flora"
    needs_pairs: ClassVar[bool] = True
    linear_in_factors: ClassVar[bool] = False
    fixed_rank: ClassVar[bool] = False
    fresh_adapter_each_round: ClassVar[bool] = True
    streams: ClassVar[bool] = True
    dp_refusal: ClassVar[str] = (
        "FLoRA stacks the clients' factors side by side and folds their product into the base "
        "weights: there is no average of clipped factors to noise, and every client's factors "
        "are released as they are"
    )

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return flora_stack(states, ranks, num_samples)

    def _open_stream(
        self,
        previous: Mapping[str, Tensor] | None,
        global_rank: int | None,
        template: Mapping[str, Tensor],
    ) -> StreamingMerge:
        # The output has rank sum_i r_i, so the stream keeps every client's factors: its
        # memory is the output's size, not one adapter's.
        return StackedStream(template)

    def redistribute(self, global_state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
        """Hand a client only the dense keys of the stacked global state.

        Under FLoRA the client folds ``flora_delta(global_state)`` into its frozen base
        weights and re-initialises a fresh rank-``rank`` LoRA, so no LoRA factor is handed
        back: truncating the stack would keep only the first clients' slices, and loading any
        of it on top of the folded base weights would count the update twice. Dense tensors
        (e.g. a classifier head) are ordinary averaged parameters and are handed back as is.

        Args:
            global_state: The stacked global state dict.
            rank: The receiving client's rank (at least 1); it sizes the client's fresh LoRA
                and does not affect the result.

        Returns:
            A new dict holding copies of the dense tensors of ``global_state``.

        Raises:
            ValueError: If ``rank`` is below 1.
        """
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        return {key: tensor.clone() for key, tensor in global_state.items() if not is_lora(key)}
