"""raFLoRA rank-partitioned aggregation (docs/algorithms.md §6.2, arXiv 2602.13486).

Sort the round's distinct ranks ``r_(1) < ... < r_(M)`` (``r_(0) = 0``). Partition ``m`` is the
rank dimensions ``r_(m-1) <= j < r_(m)`` (0-based), covered by the clients ``i`` with
``r_i >= r_(m)``, which share it with weights ``w_im = n_i / sum_{l covers m} n_l``. Per module

    dW = sum_m sum_{i covers m} w_im B_i[:, P_m] A_i[P_m, :]
       = sum_j sum_{i : r_i > j} w_ij b_ij a_ij^T            (d x k)

and the global factors are FlexLoRA's balanced truncated SVD of ``dW`` at the global rank ``R``
(``aggregation.flexlora.svd_factors``); redistribution truncates them to ``r_i``, the best
rank-``r_i`` approximation of ``dW``. Dense keys are averaged with ``p_i``.

The weight of client ``i`` on dimension ``j`` is constant over a partition, so the merge uses
FediLoRA's ``(|S|, R)`` coverer weights (``aggregation.fedilora.dimension_weights``) and one
matmul per module: ``B_cat @ A_cat`` with row ``j`` of ``A_i`` scaled by ``w_ij``
(``aggregation.pairs.stack_factors``), no loop over partitions or dimensions.

Options:

- ``partition_weights``: ``"samples"`` (default, ``w_ij = n_i / sum_{l covers j} n_l``) or
  ``"clients"`` (``w_ij = 1 / #{l covers j}``).
- ``empty_dim``: the dimensions ``max_i r_i <= j < R`` that no merged client covers keep the
  previous global adapter's part ``B_prev[:, j] A_prev[j]`` in ``dW`` (``"keep"``, default) or
  contribute nothing (``"zero"``, which is what FlexLoRA does).
- ``svd``: as FlexLoRA's.

It does not stream (``streams`` is False). It could: the round's partitions are unions of the
bands between the federation's distinct ranks and share their coverers, so per-band running
sums ``sum_i n_i B_i[:, band] A_i[band, :]`` and totals ``sum_i n_i``, divided at the end, give
``dW``. But that is one ``d x k`` sum per band and module, against ``r_i (d + k)`` per client
held by the batch merge: more memory unless a round merges more than about
``bands * d / (2 r)`` clients. So it merges the round as one batch, as FlexLoRA does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from aggregation.fedilora import EMPTY_DIM_CHOICES, EmptyDim, dimension_weights
from aggregation.flexlora import SVD_CHOICES, SvdMethod, refactor_pair
from aggregation.lora_keys import default_global_rank
from aggregation.pairs import a_matrix, b_matrix, lora_pairs, stack_factors
from aggregation.rank_merger import RankMerger
from aggregation.stacking import (
    accumulation_dtype,
    sample_weights,
    with_dense_average,
)
from aggregation.validate import check_merge_arguments, check_merge_inputs

PartitionWeights = Literal["samples", "clients"]
PARTITION_WEIGHT_CHOICES: tuple[str, ...] = get_args(PartitionWeights)


def _check_options(partition_weights: str, empty_dim: str, svd: str | None = None) -> None:
    if partition_weights not in PARTITION_WEIGHT_CHOICES:
        raise ValueError(
            f"partition_weights must be one of {PARTITION_WEIGHT_CHOICES}, "
            f"got {partition_weights!r}"
        )
    if empty_dim not in EMPTY_DIM_CHOICES:
        raise ValueError(f"empty_dim must be one of {EMPTY_DIM_CHOICES}, got {empty_dim!r}")
    if svd is not None and svd not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")


def rank_partitions(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The round's rank partitions as 0-based half-open ranges ``[r_(m-1), r_(m))``.

    Args:
        ranks: The merged clients' ranks.

    Returns:
        One ``(start, stop)`` per distinct rank, in increasing order; they tile
        ``[0, max(ranks))``.
    """
    bounds = sorted(set(int(rank) for rank in ranks))
    return list(zip([0, *bounds[:-1]], bounds, strict=True))


def rank_partition_weights(
    ranks: Sequence[int],
    num_samples: Sequence[float],
    global_rank: int,
    by: PartitionWeights = "samples",
) -> tuple[Tensor, Tensor]:
    """raFLoRA's weight ``w_ij`` of client ``i`` on dimension ``j``, and the covered dimensions.

    Args:
        ranks: Each client's rank ``r_i``.
        num_samples: Each client's sample count ``n_i`` (positive).
        global_rank: The global rank ``R``.
        by: ``"samples"``: ``w_ij = n_i / sum_{l : r_l > j} n_l``; ``"clients"``:
            ``w_ij = 1 / #{l : r_l > j}``.

    Returns:
        ``(weights, covered)`` as ``aggregation.fedilora.dimension_weights``: float64
        ``(|S|, R)`` weights, 0 where ``r_i <= j``, each covered column summing to 1 (constant
        over a partition), and the bool ``(R,)`` mask of covered dimensions.

    Raises:
        ValueError: If ``by`` is not a valid choice.
    """
    if by not in PARTITION_WEIGHT_CHOICES:
        raise ValueError(f"partition_weights must be one of {PARTITION_WEIGHT_CHOICES}, got {by!r}")
    counts = num_samples if by == "samples" else [1.0] * len(ranks)
    return dimension_weights(ranks, counts, global_rank)


def raflora_products(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    *,
    previous: Mapping[str, Tensor] | None = None,
    global_rank: int | None = None,
    partition_weights: PartitionWeights = "samples",
    empty_dim: EmptyDim = "keep",
) -> dict[str, Tensor]:
    """Every module's rank-partitioned update ``dW`` (before the SVD), as a ``d x k'`` matrix.

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        previous: The previous global adapter (rank at most ``R``). Under ``empty_dim="keep"``
            its dimensions ``max(ranks) <= j`` are added as they are; otherwise not read.
        global_rank: The global rank ``R``; defaults to ``max(ranks)``, or the rank of
            ``previous`` if larger.
        partition_weights: ``"samples"`` or ``"clients"`` (see :func:`rank_partition_weights`).
        empty_dim: ``"keep"`` the previous global part of the uncovered dimensions, or
            ``"zero"``.

    Returns:
        Module prefix -> ``dW`` of shape ``(d, k')`` (a conv's ``A`` flattened past its rank
        axis), in float32 (float64 when a client sends float64).

    Raises:
        ValueError: If an option is invalid, a factor has no partner, or the inputs are
            inconsistent (see ``check_merge_inputs``).
    """
    _check_options(partition_weights, empty_dim)
    check_merge_arguments(states, ranks, num_samples, global_rank)
    rank = global_rank if global_rank is not None else default_global_rank(ranks, previous)
    check_merge_inputs(states, ranks, num_samples, rank, previous)
    return _products(states, ranks, num_samples, previous, rank, partition_weights, empty_dim)


def _products(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    previous: Mapping[str, Tensor] | None,
    rank: int,
    by: PartitionWeights,
    empty_dim: EmptyDim,
) -> dict[str, Tensor]:
    """:func:`raflora_products` on checked inputs (module prefix -> ``d x k'`` matrix)."""
    weights, _ = rank_partition_weights(ranks, num_samples, rank, by)  # (|S|, R)
    width = max(ranks)  # dimensions [0, width) are covered, [width, R) are not
    kept = previous if empty_dim == "keep" and width < rank else None
    products: dict[str, Tensor] = {}
    for prefix, (a_key, b_key) in lora_pairs(states[0]).items():
        a_tensors = [state[a_key] for state in states]
        b_tensors = [state[b_key] for state in states]
        dtype = accumulation_dtype([*a_tensors, *b_tensors])
        b_cat, a_cat = stack_factors(a_tensors, b_tensors, weights, dtype)  # (d, Σr), (Σr, k')
        if kept is not None and kept[a_key].shape[0] > width:
            # The uncovered dimensions' previous part, B_prev[:, j] A_prev[j] with weight 1.
            b_tail = b_matrix(kept[b_key])[:, width:].to(device=b_cat.device, dtype=dtype)
            a_tail = a_matrix(kept[a_key])[width:].to(device=a_cat.device, dtype=dtype)
            b_cat = torch.cat([b_cat, b_tail], dim=1)
            a_cat = torch.cat([a_cat, a_tail], dim=0)
        products[prefix] = b_cat @ a_cat
    return products


def raflora_merge(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    *,
    previous: Mapping[str, Tensor] | None = None,
    global_rank: int | None = None,
    partition_weights: PartitionWeights = "samples",
    empty_dim: EmptyDim = "keep",
    svd: SvdMethod = "auto",
) -> dict[str, Tensor]:
    """Merge clients by raFLoRA's rank-partitioned product average, re-factored at rank ``R``.

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        previous: The previous global adapter, read only for the uncovered dimensions under
            ``empty_dim="keep"``.
        global_rank: The global rank ``R``; defaults to ``max(ranks)``, or the rank of
            ``previous`` if larger.
        partition_weights: ``"samples"`` or ``"clients"`` (see :func:`rank_partition_weights`).
        empty_dim: ``"keep"`` or ``"zero"`` (see :func:`raflora_products`).
        svd: How to factor: ``"exact"``, ``"lowrank"`` or ``"auto"`` (as FlexLoRA).

    Returns:
        A new rank-``R`` state dict, each tensor in the dtype of client 0's tensor; dense keys
        are averaged with ``p_i``.

    Raises:
        ValueError: If an option is invalid, a factor has no partner, or the inputs are
            inconsistent (see ``check_merge_inputs``).
    """
    _check_options(partition_weights, empty_dim, svd)
    check_merge_arguments(states, ranks, num_samples, global_rank)
    rank = global_rank if global_rank is not None else default_global_rank(ranks, previous)
    check_merge_inputs(states, ranks, num_samples, rank, previous)
    products = _products(states, ranks, num_samples, previous, rank, partition_weights, empty_dim)
    merged: dict[str, Tensor] = {}
    for prefix, (a_key, b_key) in lora_pairs(states[0]).items():
        merged[a_key], merged[b_key] = refactor_pair(
            products[prefix], rank, states[0][a_key], states[0][b_key], svd=svd
        )
    client_weights = sample_weights(num_samples)
    return with_dense_average(states, merged, client_weights)


class RaFLoRAMerger(RankMerger):
    """raFLoRA (docs/algorithms.md §6.2): SVD of the rank-partitioned product average.

    Args:
        partition_weights: ``"samples"`` (default) or ``"clients"``.
        empty_dim: ``"keep"`` (default) or ``"zero"`` for the dimensions no client covers.
        svd: ``"exact"``, ``"lowrank"`` or ``"auto"`` (as FlexLoRA).

    Raises:
        ValueError: If an option is not a valid choice.
    """

    name: ClassVar[str] = "raflora"
    options: ClassVar[tuple[str, ...]] = ("partition_weights", "empty_dim", "svd")
    needs_pairs: ClassVar[bool] = True
    linear_in_factors: ClassVar[bool] = False
    dp_refusal: ClassVar[str] = (
        "raFLoRA hands out the SVD factors of the rank-partitioned average of the products "
        "B_i A_i; clipping bounds the change of a client's factors, not of the products or of "
        "their SVD, so the sensitivity of the factors it releases is not bounded by "
        "privacy.clip_norm"
    )

    def __init__(
        self,
        partition_weights: PartitionWeights = "samples",
        empty_dim: EmptyDim = "keep",
        svd: SvdMethod = "auto",
    ) -> None:
        _check_options(partition_weights, empty_dim, svd)
        self.partition_weights: PartitionWeights = partition_weights
        self.empty_dim: EmptyDim = empty_dim
        self.svd: SvdMethod = svd

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return raflora_merge(
            states,
            ranks,
            num_samples,
            previous=previous,
            global_rank=global_rank,
            partition_weights=self.partition_weights,
            empty_dim=self.empty_dim,
            svd=self.svd,
        )

    def dimension_weights(
        self,
        ranks: Sequence[int],
        num_samples: Sequence[float],
        client_weights: Sequence[float],
        global_rank: int,
        covers: Tensor | None = None,
    ) -> Tensor:
        """raFLoRA's ``w_ij`` (see :func:`rank_partition_weights`): the weight client ``i``'s
        dimension ``j`` gets in the product average (its rank partitions are bands of
        leading dimensions: defined on those only)."""
        if covers is not None:
            raise ValueError("raFLoRA's weights are defined on leading dimensions")
        return rank_partition_weights(ranks, num_samples, global_rank, self.partition_weights)[0]
