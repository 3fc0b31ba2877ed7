"""Damped dimension-wise merge: fedsim's own variant of FediLoRA's reweighting
(docs/algorithms.md §1.10).

Not from the FediLoRA paper. FediLoRA gives the few clients that cover a high dimension the
full weight there (``w_ij = n_i / W_j``), so one label-skewed high-rank client can move the
global model on its top dimensions alone; zero-padding divides by the weight of every sampled
client instead and shrinks those dimensions toward zero. The damped merge blends each
dimension's FediLoRA average with the previous global value in proportion to the weight of the
clients that covered it:

    lambda_j = 1 - d * (1 - W_j / W)          W_j = sum_{i : r_i > j} n_i,  W = sum_i n_i
    X_g[j]   = lambda_j * FediLoRA_j + (1 - lambda_j) * X_prev[j]     (X = A rows, B columns)

``d`` is ``aggregation.damping`` in ``[0, 1]``: 0 is FediLoRA (with ``empty_dim=keep``); 1
weights client ``i`` by ``n_i / W`` on every dimension it covers, as zero-padding does, but
the clients that do not cover a dimension count as leaving it at its previous value instead of
zero (no dilution). A dimension no client covers keeps its previous value. Dense tensors are
averaged with ``p_i``. Redistribution truncates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from aggregation.fedilora import dimension_weights, fedilora_merge
from aggregation.lora_keys import default_global_rank, rank_axis
from aggregation.rank_merger import RankMerger
from aggregation.stacking import restore_rank_axis, stack_rank_first
from aggregation.streaming import DimensionStream, StreamingMerge
from aggregation.validate import check_merge_arguments, check_merge_inputs


def check_damping(damping: float) -> float:
    """``damping`` as a float in ``[0, 1]``.

    Raises:
        ValueError: it is not a number in ``[0, 1]`` (the message names
            ``aggregation.damping``).
    """
    try:
        value = float(damping)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"aggregation.damping must be a number in [0, 1], got {damping!r}")
    return value


def damping_factors(
    ranks: Sequence[int], num_samples: Sequence[float], global_rank: int, damping: float
) -> Tensor:
    """``(R,)`` float64: ``lambda_j = 1 - d (1 - W_j / W)`` (see the module doc)."""
    n = torch.as_tensor(num_samples, dtype=torch.float64)
    covers = torch.arange(global_rank)[None, :] < torch.as_tensor(ranks)[:, None]
    covered_share = (n[:, None] * covers).sum(dim=0) / n.sum()
    return 1.0 - damping * (1.0 - covered_share)


def _covered(ranks: Sequence[int], global_rank: int) -> Tensor:
    """``(R,)`` bool: the dimensions some client covers (``j < max r_i``)."""
    return torch.arange(global_rank) < max(ranks)


def _blend(
    merged: Mapping[str, Tensor],
    previous: Mapping[str, Tensor] | None,
    factors: Tensor,
    covered: Tensor,
    global_rank: int,
) -> dict[str, Tensor]:
    """``lambda_j * merged[j] + (1 - lambda_j) * previous[j]`` on every covered dimension of
    every LoRA key, in the merge's working dtype (float32, or float64 for float64 tensors);
    uncovered dimensions and dense keys unchanged (bit for bit: FediLoRA kept them)."""
    out = dict(merged)
    for key, tensor in merged.items():
        if rank_axis(key) is None:
            continue
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        lam = factors.to(dtype)
        lam = lam.view(-1, *([1] * (tensor.dim() - 1)))
        current = stack_rank_first(key, [tensor], global_rank, dtype)[0]
        if previous is not None and key in previous:
            prev = stack_rank_first(key, [previous[key]], global_rank, dtype)[0]
            blended = lam * current + (1 - lam) * prev
        else:
            blended = lam * current
        mask = covered.view(-1, *([1] * (tensor.dim() - 1)))
        blended = torch.where(mask, blended, current)
        out[key] = restore_rank_axis(key, blended).to(tensor.dtype)
    return out


def damped_merge(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    *,
    previous: Mapping[str, Tensor] | None = None,
    global_rank: int | None = None,
    damping: float = 1.0,
) -> dict[str, Tensor]:
    """The damped dimension-wise merge of the clients (see the module doc).

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        previous: The previous global state (any rank up to ``R``; missing dimensions and
            None count as zero).
        global_rank: ``R``; defaults to ``max(ranks)``, or the rank of ``previous`` if larger.
        damping: ``d`` in ``[0, 1]``.

    Raises:
        ValueError: ``damping`` is outside ``[0, 1]`` or the inputs are inconsistent (see
            ``check_merge_inputs``).
    """
    damping = check_damping(damping)
    check_merge_arguments(states, ranks, num_samples, global_rank)
    rank = global_rank if global_rank is not None else default_global_rank(ranks, previous)
    check_merge_inputs(states, ranks, num_samples, rank, previous)
    merged = fedilora_merge(
        states, ranks, num_samples, previous=previous, global_rank=rank, empty_dim="keep"
    )
    factors = damping_factors(ranks, num_samples, rank, damping)
    return _blend(merged, previous, factors, _covered(ranks, rank), rank)


class _DampedStream(DimensionStream):
    """FediLoRA's stream, then the blend with the previous global adapter; ``lambda_j`` comes
    from the stream's own sums (``W_j`` = the covered mass, ``W`` = all samples)."""

    def __init__(self, template, global_rank, previous, damping):
        super().__init__(template, global_rank, fill=previous)
        self._previous = previous
        self._damping = damping

    def _lora_result(self) -> dict[str, Tensor]:
        merged = super()._lora_result()
        factors = 1.0 - self._damping * (1.0 - self._mass / self._samples)
        return _blend(merged, self._previous, factors, self._mass > 0, self.global_rank)


class DampedMerger(RankMerger):
    """The damped dimension-wise merge (docs/algorithms.md §1.10; fedsim's variant, not the
    paper's).

    Args:
        damping: ``d`` in ``[0, 1]``; 0 is FediLoRA's merge.

    Raises:
        ValueError: ``damping`` is outside ``[0, 1]``.
    """

    name: ClassVar[str] = "fedilora_damped"
    options: ClassVar[tuple[str, ...]] = ("damping",)
    linear_in_factors: ClassVar[bool] = True
    streams: ClassVar[bool] = True

    def __init__(self, damping: float = 1.0) -> None:
        self.damping = check_damping(damping)

    def _combine(self, states, ranks, num_samples, previous, global_rank) -> dict[str, Tensor]:
        return damped_merge(
            states,
            ranks,
            num_samples,
            previous=previous,
            global_rank=global_rank,
            damping=self.damping,
        )

    def _open_stream(
        self,
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
        template: Mapping[str, Tensor],
    ) -> StreamingMerge:
        return _DampedStream(template, global_rank, previous, self.damping)

    def dimension_weights(
        self, ranks, num_samples, client_weights, global_rank, covers=None
    ) -> Tensor:
        """``w_ij = lambda_j n_i / W_j`` (defined on leading dimensions only)."""
        if covers is not None:
            raise ValueError("the damped merge's weights are defined on leading dimensions")
        weights = dimension_weights(ranks, num_samples, global_rank)[0]
        return weights * damping_factors(ranks, num_samples, global_rank, self.damping)
