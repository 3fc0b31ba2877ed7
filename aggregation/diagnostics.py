"""Merge diagnostics of one heterogeneous-rank round (issue 16, first part: the math).

For the global rank ``R`` and the sampled clients ``i`` (rank ``r_i``, weight ``n_i``):

- coverage of dimension ``j`` (0-based): ``c_j = #{i : r_i > j}`` and its weight
  ``W_j = sum_{i : r_i > j} n_i``;
- the merge's weight of client ``i`` on dimension ``j``: FediLoRA's dimension-wise
  ``w_ij = n_i / W_j`` (``r_i > j``), zero-padding's ``w_ij = n_i / sum_l n_l`` (``r_i > j``);
- client ``i``'s contribution to the merged adapter: ``w_ij A_i[j]`` and ``w_ij B_i[:, j]`` for
  every LoRA module; its norm ``||c_i||`` over all modules and dimensions, and the part in the
  dimensions that only ``i`` and higher-rank clients cover, ``[m_i, r_i)`` with
  ``m_i = max{r_l : r_l < r_i}`` (0 if none): where a high-rank client's update is averaged
  only with clients at least as high;
- the global update per dimension: ``||A_g[j] - A_prev[j]||^2 + ||B_g[:, j] - B_prev[:, j]||^2``
  summed over modules, square-rooted.

Every quantity is computed with tensor operations over all clients and dimensions at once
(one pass over each module's factors); tests/aggregation/test_diagnostics.py checks them
against explicit loops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from aggregation.lora_keys import rank_axis

WEIGHTINGS = ("fedilora", "zeropad")


@dataclass
class MergeDiagnostics:
    """What one round's merge did per dimension and per client (float64 tensors).

    Attributes:
        coverage: ``(R,)`` how many sampled clients cover each dimension.
        weight: ``(R,)`` their total weight ``W_j``.
        contribution: ``(S,)`` the norm of each client's contribution to the merged adapter.
        contribution_top: ``(S,)`` its part in the client's top band ``[m_i, r_i)``.
        share: ``(S,)`` each client's share of the summed squared contributions.
        top_band: ``(S, 2)`` each client's band ``[m_i, r_i)``.
        update_norm: ``(R,)`` the norm of the global update per dimension (None without a
            merged and a previous adapter).
    """

    coverage: Tensor
    weight: Tensor
    contribution: Tensor
    contribution_top: Tensor
    share: Tensor
    top_band: Tensor
    update_norm: Tensor | None = None


def _rank_rows(key: str, tensor: Tensor) -> Tensor | None:
    """The tensor as ``(rank, -1)`` rows (one row per rank dimension), or None for a tensor
    that has no rank axis (dense weights, biases)."""
    axis = rank_axis(key)
    if axis is None:
        return None
    return tensor.detach().to(torch.float64).movedim(axis, 0).reshape(tensor.shape[axis], -1)


def dimension_sq_norms(state: Mapping[str, Tensor], rank: int) -> Tensor:
    """``(rank,)``: the squared norm of every rank dimension of ``state``, over all modules
    (``||A[j]||^2 + ||B[:, j]||^2`` summed over the LoRA pairs)."""
    out = torch.zeros(rank, dtype=torch.float64)
    for key, tensor in state.items():
        rows = _rank_rows(key, tensor)
        if rows is not None:
            out[: rows.shape[0]] += rows.square().sum(dim=1)[:rank]
    return out


def merge_weights(
    ranks: Sequence[int], num_samples: Sequence[float], global_rank: int, weighting: str
) -> Tensor:
    """``(S, R)``: the merge's weight of each client on each dimension (see module doc)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    n = torch.as_tensor(num_samples, dtype=torch.float64)
    covers = torch.arange(global_rank)[None, :] < torch.as_tensor(ranks)[:, None]
    mass = n[:, None] * covers
    if weighting == "zeropad":
        return mass / n.sum()
    totals = mass.sum(dim=0)
    return mass / torch.where(totals > 0, totals, torch.ones_like(totals))


def top_bands(ranks: Sequence[int]) -> Tensor:
    """``(S, 2)``: each client's ``[m_i, r_i)``, the dimensions only it and higher-rank
    clients of the round cover."""
    r = torch.as_tensor(ranks, dtype=torch.long)
    lower = torch.where(r[None, :] < r[:, None], r[None, :], torch.zeros_like(r)[None, :])
    return torch.stack([lower.max(dim=1).values, r], dim=1)


def merge_diagnostics(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    global_rank: int,
    weighting: str = "fedilora",
    merged: Mapping[str, Tensor] | None = None,
    previous: Mapping[str, Tensor] | None = None,
) -> MergeDiagnostics:
    """The diagnostics of one round (see the module doc).

    Args:
        states: the clients' uploaded LoRA states (client ``i`` at rank ``ranks[i]``).
        ranks, num_samples: each client's rank and merge weight ``n_i``.
        global_rank: ``R``.
        weighting: ``fedilora`` (dimension-wise) or ``zeropad``.
        merged, previous: the round's merged and previous global adapters (rank ``R``, or
            less: missing dimensions count as zero), for the update norm per dimension.
    """
    weights = merge_weights(ranks, num_samples, global_rank, weighting)  # (S, R)
    covers = weights > 0
    n = torch.as_tensor(num_samples, dtype=torch.float64)
    coverage = covers.sum(dim=0).to(torch.float64)
    weight = (n[:, None] * covers).sum(dim=0)
    sq = torch.stack(
        [dimension_sq_norms(s, global_rank) for s in states]
    )  # (S, R): ||x_ij||^2 over modules
    contrib_sq = weights.square() * sq  # (S, R)
    bands = top_bands(ranks)
    dims = torch.arange(global_rank)[None, :]
    in_top = (dims >= bands[:, :1]) & (dims < bands[:, 1:])
    total = contrib_sq.sum(dim=1)
    grand = total.sum()
    update = None
    if merged is not None and previous is not None:
        update = torch.zeros(global_rank, dtype=torch.float64)
        for key, tensor in merged.items():
            rows = _rank_rows(key, tensor)
            if rows is None:
                continue
            before = torch.zeros_like(rows)
            if key in previous:
                prev = _rank_rows(key, previous[key])
                before[: prev.shape[0]] = prev
            update[: rows.shape[0]] += (rows - before).square().sum(dim=1)[:global_rank]
        update = update.sqrt()
    return MergeDiagnostics(
        coverage=coverage,
        weight=weight,
        contribution=total.sqrt(),
        contribution_top=(contrib_sq * in_top).sum(dim=1).sqrt(),
        share=total / grand if grand > 0 else torch.zeros_like(total),
        top_band=bands,
        update_norm=update,
    )
