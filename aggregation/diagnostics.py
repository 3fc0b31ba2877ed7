"""Merge diagnostics of one heterogeneous-rank round (docs/algorithms.md §1.9).

For the global rank ``R``, the sampled clients ``i`` (rank ``r_i``, sample count ``n_i``), the
dimensions ``D_i`` each client's upload holds (the leading ``0..r_i-1`` unless a method says
otherwise: Fed-PLoRA's modules ``K_i``, docs/algorithms.md §6.3) and the merge's weight ``w_ij``
of client ``i`` on dimension ``j`` (0-based; 0 where ``j`` is not in ``D_i``), given by the
merger (:meth:`aggregation.RankMerger.dimension_weights`):

- coverage of dimension ``j``: ``c_j = #{i : j in D_i}`` and its weight
  ``W_j = sum_{i : j in D_i} n_i``;
- client ``i``'s contribution to the merged update: ``w_ij (A_i[j] - A_prev[j])`` and
  ``w_ij (B_i[:, j] - B_prev[:, j])`` for every LoRA module (``prev`` = the global adapter the
  round started from); its norm ``||c_i||`` over all modules and dimensions, and the part in
  the dimensions only ``i`` and higher-rank clients cover, ``[m_i, r_i)`` with
  ``m_i = max{r_l : r_l < r_i}`` (0 if none): where a high-rank client's update is averaged
  only with clients at least as high (a band of leading dimensions: left out when a client
  holds other dimensions than its leading ones, where no such band exists);
- its share ``||c_i||^2 / sum_l ||c_l||^2``;
- the global update per dimension: ``||A_new[j] - A_prev[j]||^2 + ||B_new[:, j] - B_prev[:, j]||^2``
  summed over modules, square-rooted (after the server optimiser: what the round changed).

Where the weights of a dimension sum to 1 (FediLoRA), the contributions add up exactly to the
merged update; where they sum to less (zero-padding's dilution) the rest of the update is the
shrinkage ``-(1 - sum_i w_ij) prev[j]``, no client's.

The server keeps only ``(R,)`` numbers per client: :func:`dimension_sq_norms` is one pass over
an update as it arrives (streaming or batch), :func:`merge_diagnostics` combines them with
tensor operations over all clients and dimensions at once; tests/aggregation/test_diagnostics.py
checks them against explicit loops.

The energy of the global adapter per rank band (docs/algorithms.md §6.1) is measured here too:
each LoRA module's singular values of ``B_g A_g`` come from an ``R x R`` problem
(:func:`product_singular_values`, never the ``d x k`` product), :func:`rank_energy` groups
their squares into the federation's rank bands, per module and summed over the adapter, and
:func:`energy_metrics` names the MLflow metrics (``merge/energy_share_band_LO-HI``,
``merge/rank_collapse``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from aggregation.lora_keys import rank_axis
from aggregation.pairs import a_matrix, b_matrix, lora_pairs


@dataclass
class MergeDiagnostics:
    """What one round's merge did per dimension and per client (float64 tensors).

    Attributes:
        coverage: ``(R,)`` how many sampled clients cover each dimension.
        weight: ``(R,)`` their total sample count ``W_j``.
        merge_weight: ``(R,)`` the merge's total weight ``sum_i w_ij`` on each dimension (1 for
            a dimension-wise average, the covered share for zero-padding).
        contribution: ``(S,)`` the norm of each client's contribution to the merged update.
        contribution_top: ``(S,)`` its part in the client's top band ``[m_i, r_i)``; None
            when the clients hold other dimensions than their leading ones (no such band).
        share: ``(S,)`` each client's share of the summed squared contributions.
        top_band: ``(S, 2)`` each client's band ``[m_i, r_i)``; None where
            ``contribution_top`` is.
        update_norm: ``(R,)`` the norm of the global update per dimension, or None.
    """

    coverage: Tensor
    weight: Tensor
    merge_weight: Tensor
    contribution: Tensor
    contribution_top: Tensor | None
    share: Tensor
    top_band: Tensor | None
    update_norm: Tensor | None = None

    def client_columns(self, client_ids: Sequence[int]) -> dict[int, dict[str, float | str]]:
        """Per client id: ``contribution``, ``share`` and, when the round has top bands,
        ``contribution_top`` and ``top_band`` (``"m-r"``), the columns of the round's client
        table."""
        out: dict[int, dict[str, float | str]] = {}
        for i, cid in enumerate(client_ids):
            row: dict[str, float | str] = {"contribution": float(self.contribution[i])}
            if self.contribution_top is not None:
                row["contribution_top"] = float(self.contribution_top[i])
            row["share"] = float(self.share[i])
            if self.top_band is not None:
                row["top_band"] = f"{int(self.top_band[i, 0])}-{int(self.top_band[i, 1])}"
            out[cid] = row
        return out

    def dimensions(self) -> dict[str, list[float] | bool]:
        """The per-dimension vectors as lists (JSON): coverage, weight, merge_weight and, when
        known, update_norm; ``"leading": False`` when the clients held other dimensions than
        their leading ones (no top band; absent otherwise, as in every earlier run)."""
        out: dict[str, list[float] | bool] = {
            "coverage": [int(v) for v in self.coverage],
            "weight": self.weight.tolist(),
            "merge_weight": self.merge_weight.tolist(),
        }
        if self.update_norm is not None:
            out["update_norm"] = self.update_norm.tolist()
        if self.top_band is None:
            out["leading"] = False
        return out


def dimension_sq_norms(
    state: Mapping[str, Tensor],
    rank: int,
    previous: Mapping[str, Tensor] | None = None,
    dims: Sequence[int] | None = None,
) -> Tensor:
    """``(rank,)`` float64: the squared norm of every rank dimension of ``state - previous``,
    over all LoRA modules (``||A[j] - A_prev[j]||^2 + ||B[:, j] - B_prev[:, j]||^2`` summed over
    the factors). ``previous`` is zero-padded or truncated to the state's rank; a key it lacks
    counts as zero; None means zero. Dimensions past a tensor's rank are 0.

    With ``dims``, position ``p`` of the state's rank axis is dimension ``dims[p]`` of the
    rank-``rank`` adapter (Fed-PLoRA's modules ``K_i``, docs/algorithms.md §6.3): it is
    compared with ``previous``'s dimension ``dims[p]`` (which ``previous`` must hold) and its
    squared norm lands at ``dims[p]``; every other dimension is 0.

    One subtraction and one sum of squares per factor, in the factor's own dtype (float32 and
    float64; half precision is computed in float32), reduced over every axis but the rank axis
    in place, so no transposed or float64 copy of the update is made; the ``(rank,)`` results
    are added in float64.

    Raises:
        ValueError: ``dims`` repeats a dimension, leaves ``[0, rank)`` or does not give one
            dimension per position of a factor's rank axis.
    """
    if dims is not None:
        return _scattered_sq_norms(state, rank, previous, dims)
    out = torch.zeros(rank, dtype=torch.float64)
    sums: dict[int, list[Tensor]] = {}  # width -> each factor's (width,) sums of squares
    for key, tensor in state.items():
        axis = rank_axis(key)
        if axis is None:
            continue
        width = min(tensor.shape[axis], rank)
        x = tensor.detach().narrow(axis, 0, width)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if previous is not None and key in previous:
            prev = previous[key].detach()
            shared = min(width, prev.shape[axis])
            prev = prev.narrow(axis, 0, shared).to(x.dtype)
            if shared == width:
                x = x - prev
            else:  # dimensions past previous's rank count from zero
                x = x.clone()
                x.narrow(axis, 0, shared).sub_(prev)
        other = [d for d in range(x.dim()) if d != axis]
        sums.setdefault(width, []).append(x.square().sum(dim=other) if other else x.square())
    for width, parts in sums.items():  # one float64 sum per width, not one per factor
        out[:width] += torch.stack([p.to(torch.float64) for p in parts]).sum(dim=0)
    return out


def _scattered_sq_norms(
    state: Mapping[str, Tensor],
    rank: int,
    previous: Mapping[str, Tensor] | None,
    dims: Sequence[int],
) -> Tensor:
    """:func:`dimension_sq_norms` of a state whose positions are the dimensions ``dims``."""
    dims = [int(j) for j in dims]
    if len(set(dims)) != len(dims) or not all(0 <= j < rank for j in dims):
        raise ValueError(f"dimensions {dims} must be distinct and in [0, {rank})")
    index = torch.as_tensor(dims, dtype=torch.long)
    for key, tensor in state.items():
        axis = rank_axis(key)
        if axis is not None and tensor.shape[axis] != len(dims):
            raise ValueError(f"{key} has rank {tensor.shape[axis]} but {len(dims)} dimensions")
    reference = None
    if previous is not None:  # previous's rows of those dimensions, in the state's order
        reference = {
            key: tensor.detach().index_select(rank_axis(key), index.to(tensor.device))
            for key, tensor in previous.items()
            if key in state and rank_axis(key) is not None
        }
    out = torch.zeros(rank, dtype=torch.float64)
    out[index] = dimension_sq_norms(state, len(dims), reference)
    return out


def dimension_mask(ranks: Sequence[int], dims: Sequence[Sequence[int] | None], rank: int) -> Tensor:
    """``(S, rank)`` bool: which dimensions each client holds, ``dims[i]`` (its leading
    ``ranks[i]`` where ``dims[i]`` is None)."""
    mask = torch.arange(rank)[None, :] < torch.as_tensor(ranks, dtype=torch.long)[:, None]
    for i, held in enumerate(dims):
        if held is not None:
            mask[i] = False
            mask[i, torch.as_tensor([int(j) for j in held], dtype=torch.long)] = True
    return mask


def top_bands(ranks: Sequence[int]) -> Tensor:
    """``(S, 2)``: each client's ``[m_i, r_i)``, the dimensions only it and higher-rank
    clients of the round cover (``m_i`` from the sorted distinct ranks: no ``S x S``
    comparison, so a round of thousands of clients stays small)."""
    r = torch.as_tensor(ranks, dtype=torch.long)
    levels = torch.cat([torch.zeros(1, dtype=torch.long), torch.unique(r)])  # sorted
    lower = levels[torch.searchsorted(levels, r) - 1]
    return torch.stack([lower, r], dim=1)


def merge_diagnostics(
    sq_norms: Tensor,
    ranks: Sequence[int],
    num_samples: Sequence[float],
    weights: Tensor,
    update_norm: Tensor | None = None,
    covers: Tensor | None = None,
) -> MergeDiagnostics:
    """The diagnostics of one round (see the module doc).

    Args:
        sq_norms: ``(S, R)``: each client's :func:`dimension_sq_norms` of its update against
            the global adapter the round started from.
        ranks, num_samples: each client's rank ``r_i`` and sample count ``n_i``.
        weights: ``(S, R)``: the merge's ``w_ij`` (0 where client ``i`` does not hold ``j``).
        update_norm: ``(R,)``: the global update's norm per dimension, if known.
        covers: ``(S, R)`` bool: the dimensions each client holds (:func:`dimension_mask`),
            when they are not the leading ``r_i``; coverage and ``W_j`` count them, and the
            top band, a band of leading dimensions, is left out (None).

    Raises:
        ValueError: the shapes disagree, or a row of ``covers`` does not hold ``r_i``
            dimensions.
    """
    s, r = weights.shape
    if sq_norms.shape != (s, r) or len(ranks) != s or len(num_samples) != s:
        raise ValueError(
            f"diagnostics inputs disagree: weights {tuple(weights.shape)}, norms "
            f"{tuple(sq_norms.shape)}, {len(ranks)} ranks, {len(num_samples)} sample counts"
        )
    dims = torch.arange(r)[None, :]
    leading = covers is None
    if leading:
        covers = dims < torch.as_tensor(ranks)[:, None]  # (S, R)
    elif covers.shape != (s, r) or covers.sum(dim=1).tolist() != [int(v) for v in ranks]:
        raise ValueError(
            f"diagnostics inputs disagree: a {tuple(covers.shape)} dimension mask for "
            f"{s} clients of ranks {list(ranks)} and {r} dimensions"
        )
    n = torch.as_tensor(num_samples, dtype=torch.float64)
    contrib_sq = weights.to(torch.float64).square() * sq_norms  # (S, R)
    bands = top = None
    if leading:
        bands = top_bands(ranks)
        in_top = (dims >= bands[:, :1]) & (dims < bands[:, 1:])
        top = (contrib_sq * in_top).sum(dim=1).sqrt()
    total = contrib_sq.sum(dim=1)
    grand = total.sum()
    return MergeDiagnostics(
        coverage=covers.sum(dim=0).to(torch.float64),
        weight=(n[:, None] * covers).sum(dim=0),
        merge_weight=weights.to(torch.float64).sum(dim=0),
        contribution=total.sqrt(),
        contribution_top=top,
        share=total / grand if grand > 0 else torch.zeros_like(total),
        top_band=bands,
        update_norm=update_norm,
    )


def diagnose(
    merger,
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    global_rank: int,
    previous: Mapping[str, Tensor] | None = None,
    new: Mapping[str, Tensor] | None = None,
    dims: Sequence[Sequence[int] | None] | None = None,
) -> MergeDiagnostics:
    """:func:`merge_diagnostics` of a batch of client states under ``merger``'s weights;
    with ``new`` (the merged global adapter), the update norm per dimension too; with
    ``dims``, the dimensions each state holds (see :meth:`DiagnosticsParts.add`)."""
    parts = DiagnosticsParts(merger, global_rank, previous)
    held = [None] * len(states) if dims is None else dims
    for state, rank, n, d in zip(states, ranks, num_samples, held, strict=True):
        parts.add(state, rank, n, d)
    return parts.result(new)


class DiagnosticsParts:
    """What the server keeps of a round's updates for the diagnostics, as they arrive: each
    client's rank, sample count, merge weight, the dimensions it holds (when a method says they
    are not the leading ones) and ``(R,)`` squared change per dimension (one pass over the
    update, :func:`dimension_sq_norms`), in one float64 buffer that doubles when full, so many
    small tensors never interleave with the updates' memory.

    Args:
        merger: the round's merger (its ``client_weight`` and ``dimension_weights``).
        global_rank: ``R``.
        previous: the global adapter the round started from (the updates' reference).
    """

    def __init__(self, merger, global_rank: int, previous: Mapping[str, Tensor] | None):
        self.merger = merger
        self.global_rank = global_rank
        self.previous = previous
        self.ranks: list[int] = []
        self.counts: list[float] = []
        self.client_weights: list[float] = []
        self.dims: list[list[int] | None] = []
        self._sq = torch.zeros(16, global_rank, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.ranks)

    def add(
        self,
        state: Mapping[str, Tensor],
        rank: int,
        num_samples: float,
        dims: Sequence[int] | None = None,
    ) -> None:
        """Take one accepted update (the tensors are not kept). ``dims``: the global
        dimensions its rank positions stand for, in order (Fed-PLoRA's ``K_i``:
        :meth:`fedsim.methods.base.ServerHooks.upload_dimensions`); None: the leading
        ``rank``."""
        i = len(self.ranks)
        if i == self._sq.shape[0]:
            grown = torch.zeros(2 * i, self.global_rank, dtype=torch.float64)
            grown[:i] = self._sq
            self._sq = grown
        self._sq[i] = dimension_sq_norms(state, self.global_rank, self.previous, dims)
        self.client_weights.append(float(self.merger.client_weight(state, num_samples)))
        self.ranks.append(int(rank))
        self.counts.append(float(num_samples))
        self.dims.append(None if dims is None else [int(j) for j in dims])

    def result(self, new: Mapping[str, Tensor] | None = None) -> MergeDiagnostics:
        """The round's diagnostics; with ``new`` (the new global adapter) the update norm per
        dimension too. When some update held other dimensions than its leading ones, the merge
        weights, coverage and ``W_j`` follow the dimensions each client holds and the top band
        is left out (:func:`merge_diagnostics`)."""
        covers = None
        if any(d is not None for d in self.dims):
            covers = dimension_mask(self.ranks, self.dims, self.global_rank)
        weights = self.merger.dimension_weights(
            self.ranks, self.counts, self.client_weights, self.global_rank, covers=covers
        )
        update = None
        if new is not None:
            update = dimension_sq_norms(new, self.global_rank, self.previous).sqrt()
        sq = self._sq[: len(self.ranks)]
        return merge_diagnostics(sq, self.ranks, self.counts, weights, update, covers)


def band_metrics(dims: Mapping[str, list[float]], levels: Sequence[int]) -> dict[str, float]:
    """MLflow metrics of one round per dimension band ``[l_k, l_{k+1})`` between consecutive
    rank levels (the federation's distinct ranks, 0 first): ``merge/band_LO-HI/coverage``
    and ``/weight`` (of the band's first dimension: with leading dimensions coverage falls
    with ``j``, and is constant inside a band unless pruning cut ranks below the federation's;
    their means over the band when ``dims["leading"]`` is False), ``/merge_weight`` (mean
    over the band) and ``/update_norm`` (the band's norm)."""
    edges = sorted({0, *(int(v) for v in levels)})
    out: dict[str, float] = {}
    width = len(dims["coverage"])
    for lo, hi in zip(edges, edges[1:]):
        if lo >= width:
            break
        hi = min(hi, width)
        name = f"merge/band_{lo:02d}-{hi:02d}"
        if dims.get("leading", True):  # the band's first dimension
            out[f"{name}/coverage"] = float(dims["coverage"][lo])
            out[f"{name}/weight"] = float(dims["weight"][lo])
        else:  # coverage varies inside the band: its mean
            out[f"{name}/coverage"] = sum(dims["coverage"][lo:hi]) / (hi - lo)
            out[f"{name}/weight"] = sum(dims["weight"][lo:hi]) / (hi - lo)
        out[f"{name}/merge_weight"] = sum(dims["merge_weight"][lo:hi]) / (hi - lo)
        if "update_norm" in dims:
            out[f"{name}/update_norm"] = sum(v * v for v in dims["update_norm"][lo:hi]) ** 0.5
    return out


# -- energy per rank band (docs/algorithms.md §6.1) -----------------------------------------------
def product_singular_values(a: Tensor, b: Tensor) -> Tensor:
    """The singular values of one module's ``B @ A``, descending, float64, from the factors.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR, orthonormal columns in ``Q``), so
    ``B A = Q_B (R_B R_A^T) Q_A^T`` has the singular values of the small ``R_B R_A^T``: cost
    ``O((d + k) r^2)``, the ``d x k`` product is never formed.

    Args:
        a: the module's ``lora_A`` weight ``(r, k, ...)``.
        b: its ``lora_B`` weight ``(d, r)`` or ``(d, r, 1, 1)``.

    Returns:
        ``(min(d, r, k'),)`` float64 (``k'`` the flattened width of ``A``).
    """
    return _svdvals(b_matrix(b.detach())[None], a_matrix(a.detach())[None])[0]


def _svdvals(b: Tensor, a: Tensor) -> Tensor:
    """``(n, min(d, r, k))``: the singular values of each ``b[i] @ a[i]`` of a batch of
    ``(n, d, r)`` and ``(n, r, k)`` factors, through the ``R_B R_A^T`` of their QRs (float64)."""
    r_b = torch.linalg.qr(b.to(torch.float64), mode="r").R  # (n, min(d, r), r)
    r_a = torch.linalg.qr(a.to(torch.float64).transpose(-1, -2), mode="r").R  # (n, min(k, r), r)
    return torch.linalg.svdvals(r_b @ r_a.transpose(-1, -2))


def rank_bands(levels: Sequence[int], global_rank: int) -> list[tuple[int, int]]:
    """The rank bands ``(lo, hi)``, 1-based and inclusive: ``1..r_(1)``, ``r_(1)+1..r_(2)``,
    ..., up to ``global_rank``, from the federation's distinct ranks ``levels`` (those at or
    above ``global_rank`` end the last band there)."""
    edges = sorted({int(v) for v in levels if 0 < int(v) < global_rank} | {int(global_rank)})
    return list(zip([1] + [e + 1 for e in edges[:-1]], edges))


def band_sums(sq: Tensor, bands: Sequence[tuple[int, int]]) -> Tensor:
    """``(M,)``: the sum of ``sq[j - 1]`` over each band's ``j`` (``sq`` shorter than a band
    counts as zero there)."""
    return torch.stack([sq[lo - 1 : hi].sum() for lo, hi in bands]).to(torch.float64)


def _shares(energy: Tensor) -> list[float]:
    total = float(energy.sum())
    return (energy / total).tolist() if total > 0 else [0.0] * len(energy)


def rank_energy(
    state: Mapping[str, Tensor], levels: Sequence[int], global_rank: int
) -> dict | None:
    """The energy of the global adapter's product per rank band (docs/algorithms.md §6.1).

    Per LoRA module ``m`` of ``state``, the squared singular values
    ``sigma_j^2`` of ``B_g A_g`` (descending, ``j`` from 1) are summed per band: ``E_mb``. The
    module's shares are ``E_mb / sum_b E_mb``; the adapter's are ``sum_m E_mb`` over
    ``sum_m sum_b E_mb`` (energy summed over modules, then divided). Shares are all 0 where the
    energy is 0.

    Args:
        state: the global adapter (``s = 1`` space).
        levels: the federation's client ranks (the band edges).
        global_rank: ``R``.

    Returns:
        ``{"bands": ["1-2", ...], "energy": [...], "share": [...], "modules": {prefix:
        {"energy": E_m, "share": [...]}}}`` (JSON-ready), or None when ``state`` holds no
        LoRA module with both factors (a sharing policy that shares one factor).
    """
    bands = rank_bands(levels, global_rank)
    try:
        pairs = lora_pairs(k for k in state if rank_axis(k) is not None)
    except ValueError:  # one factor shared without the other (sharing.policy=A or B)
        return None
    if not pairs:
        return None
    groups: dict[tuple, list[str]] = {}  # modules of equal factor shapes share one batched QR
    for prefix, (a_key, b_key) in pairs.items():
        groups.setdefault((state[a_key].shape, state[b_key].shape), []).append(prefix)
    energies: dict[str, Tensor] = {}
    for members in groups.values():
        a = torch.stack([a_matrix(state[pairs[p][0]].detach()) for p in members])
        b = torch.stack([b_matrix(state[pairs[p][1]].detach()) for p in members])
        sq = _svdvals(b, a).square().cpu()
        for prefix, row in zip(members, sq, strict=True):
            energies[prefix] = band_sums(row, bands)
    modules: dict[str, dict] = {}
    total = torch.zeros(len(bands), dtype=torch.float64)
    for prefix in pairs:  # in the adapter's key order
        energy = energies[prefix]
        total += energy
        modules[prefix.rstrip(".")] = {"energy": float(energy.sum()), "share": _shares(energy)}
    return {
        "bands": [f"{lo}-{hi}" for lo, hi in bands],
        "energy": total.tolist(),
        "share": _shares(total),
        "modules": modules,
    }


def energy_metrics(energy: Mapping | None) -> dict[str, float]:
    """The MLflow metrics of :func:`rank_energy`'s adapter shares:
    ``merge/energy_share_band_LO-HI`` per band and ``merge/rank_collapse``, the share of the
    first band ``1..r_min`` (none without an energy block)."""
    if not energy:
        return {}
    out = {
        f"merge/energy_share_band_{band}": float(share)
        for band, share in zip(energy["bands"], energy["share"], strict=True)
    }
    out["merge/rank_collapse"] = float(energy["share"][0])
    return out
