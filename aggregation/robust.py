"""Robust aggregation rules (docs/algorithms.md §4b) on client updates in one aligned space.

Each rule takes the sampled clients' updates ``u_i`` as state dicts with the same keys and
shapes (for LoRA factors: zero-padded to the global rank ``R``, or any other aligned space the
caller chooses; the caller says which) and treats each update as one flat vector, the
concatenation of its tensors in sorted key order. Inputs are never mutated; results are float32
(float64 if an input is) and cast back to the inputs' dtype per key.

- :func:`clip_to_norm`: norm bounding, ``u_i * min(1, C / ||u_i||)``.
- :func:`coordinate_median`, :func:`trimmed_mean`: per coordinate.
- :func:`krum_scores`, :func:`multi_krum`: Krum's score (the sum of squared distances to the
  ``n - f - 2`` nearest other updates) and the mean of the ``m`` best-scored updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from aggregation.stacking import accumulation_dtype

State = Mapping[str, Tensor]


def _check(updates: Sequence[State]) -> list[str]:
    if not updates:
        raise ValueError("need at least one client update")
    keys = sorted(updates[0])
    for i, u in enumerate(updates):
        if sorted(u) != keys:
            raise ValueError(f"client {i}: keys differ from client 0's")
        for k in keys:
            if u[k].shape != updates[0][k].shape:
                raise ValueError(
                    f"client {i}: {k} has shape {tuple(u[k].shape)}, client 0's "
                    f"{tuple(updates[0][k].shape)}"
                )
    return keys


def _flat(updates: Sequence[State], keys: list[str]) -> Tensor:
    """``(n, D)``: each update as one row, its tensors in sorted key order."""
    dtype = accumulation_dtype([t for u in updates for t in u.values()])
    return torch.stack([torch.cat([u[k].reshape(-1).to(dtype) for k in keys]) for u in updates])


def _unflat(row: Tensor, like: State, keys: list[str]) -> dict[str, Tensor]:
    out, start = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = row[start : start + n].reshape(like[k].shape).to(like[k].dtype)
        start += n
    return out


def update_norms(updates: Sequence[State]) -> list[float]:
    """The L2 norm of each update over all its tensors."""
    keys = _check(updates)
    return [float(n) for n in _flat(updates, keys).norm(dim=1)]


def clip_to_norm(updates: Sequence[State], max_norm: float) -> tuple[list[dict], list[float]]:
    """Norm bounding: scale each update whose L2 norm exceeds ``max_norm`` down to it.

    Returns:
        ``(clipped, scales)``: new state dicts, and each update's factor
        ``min(1, max_norm / ||u_i||)`` (1.0: untouched).

    Raises:
        ValueError: ``max_norm`` is not a positive finite number, or the updates disagree.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
    keys = _check(updates)
    flat = _flat(updates, keys)
    norms = flat.norm(dim=1)
    scales = torch.clamp(max_norm / torch.clamp(norms, min=torch.finfo(flat.dtype).tiny), max=1.0)
    clipped = [_unflat(row * s, u, keys) for row, s, u in zip(flat, scales, updates)]
    return clipped, [float(s) for s in scales]


def coordinate_median(updates: Sequence[State]) -> dict[str, Tensor]:
    """The coordinate-wise median (the mean of the two middle values for an even count)."""
    keys = _check(updates)
    flat = _flat(updates, keys)
    ordered = flat.sort(dim=0).values
    n = flat.shape[0]
    mid = ordered[(n - 1) // 2 : n // 2 + 1].mean(dim=0)
    return _unflat(mid, updates[0], keys)


def trimmed_mean(updates: Sequence[State], beta: float) -> dict[str, Tensor]:
    """Per coordinate, drop the ``floor(beta * n)`` largest and smallest values, average the rest.

    Raises:
        ValueError: ``beta`` outside ``[0, 0.5)`` or trimming would leave no value.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    keys = _check(updates)
    flat = _flat(updates, keys)
    n = flat.shape[0]
    k = math.floor(beta * n)
    if n - 2 * k < 1:
        raise ValueError(f"trimming {k} of each end of {n} updates leaves none")
    kept = flat.sort(dim=0).values[k : n - k]
    return _unflat(kept.mean(dim=0), updates[0], keys)


def krum_scores(updates: Sequence[State], num_faulty: int) -> list[float]:
    """Krum's score of each update: the sum of its squared distances to its ``n - f - 2``
    nearest other updates (lower is more central).

    Raises:
        ValueError: ``n - f - 2 < 1`` (Krum needs ``n > f + 2``).
    """
    keys = _check(updates)
    n = len(updates)
    neighbours = n - num_faulty - 2
    if num_faulty < 0 or neighbours < 1:
        raise ValueError(f"Krum needs n > f + 2 and f >= 0; got n={n} updates and f={num_faulty}")
    flat = _flat(updates, keys)
    dist = torch.cdist(flat, flat).pow(2)  # (n, n)
    dist.fill_diagonal_(float("inf"))  # an update is not its own neighbour
    nearest = dist.sort(dim=1).values[:, :neighbours]
    return [float(s) for s in nearest.sum(dim=1)]


def multi_krum(
    updates: Sequence[State], num_faulty: int, num_selected: int = 1
) -> tuple[dict[str, Tensor], list[int]]:
    """Multi-Krum: the mean of the ``m`` lowest-scored updates (``m = 1``: Krum itself).

    Ties are broken by client order, so the result does not depend on anything else.

    Returns:
        ``(merged, selected)``: the mean, and the indices of the updates it averages (sorted).

    Raises:
        ValueError: ``num_selected`` outside ``[1, n]``, or Krum's own condition fails.
    """
    n = len(updates)
    if not 1 <= num_selected <= n:
        raise ValueError(f"num_selected must be in [1, {n}], got {num_selected}")
    scores = krum_scores(updates, num_faulty)
    selected = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:num_selected])
    keys = sorted(updates[0])
    mean = _flat([updates[i] for i in selected], keys).mean(dim=0)
    return _unflat(mean, updates[0], keys), selected


# -- heterogeneous ranks -------------------------------------------------------------------
def rank_bands(ranks: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """The rank dimensions grouped by who covers them: ``(lo, hi, clients)`` per band.

    Dimension ``j`` (0-based) is covered by the clients with ``r_i > j``; between two
    consecutive distinct ranks that set does not change. Bands are in increasing ``lo``.
    """
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive, got {list(ranks)}")
    out, lo = [], 0
    for hi in sorted(set(ranks)):
        out.append((lo, hi, [i for i, r in enumerate(ranks) if r >= hi]))
        lo = hi
    return out


def covered_statistic(
    deltas: Sequence[State], ranks: Sequence[int], statistic
) -> list[dict[str, Tensor]]:
    """Replace every client's covered coordinates by ``statistic`` over the clients covering them.

    ``deltas[i]`` holds client ``i``'s tensors at its own rank ``ranks[i]``. For each rank band
    (:func:`rank_bands`) and LoRA key, the band's slice of every covering client goes to
    ``statistic`` (a function of a list of one-key states, e.g. :func:`coordinate_median`), and
    each of them gets the result; a dense key is one band covered by every client. A merge of
    the results then sees the statistic wherever a client has a value: any weighted average
    over the clients covering a coordinate returns the statistic exactly.

    Returns:
        New state dicts, each at its client's rank.
    """
    from aggregation.lora_keys import rank_axis

    if len(deltas) != len(ranks):
        raise ValueError(f"{len(deltas)} updates but {len(ranks)} ranks")
    keys = sorted(deltas[0])
    out = [{k: d[k].clone() for k in keys} for d in deltas]
    bands = rank_bands(ranks)
    for k in keys:
        axis = rank_axis(k)
        if axis is None:
            value = statistic([{k: d[k]} for d in deltas])[k]
            for o in out:
                o[k] = value.clone()
            continue
        for lo, hi, members in bands:
            slices = [{k: deltas[i][k].narrow(axis, lo, hi - lo)} for i in members]
            value = statistic(slices)[k]
            for i in members:
                out[i][k].narrow(axis, lo, hi - lo).copy_(value)
    return out


def product_distances(
    updates: Sequence[State], origins: Sequence[State]
) -> tuple[Tensor, list[str]]:
    """Squared distances between the clients' updates in the space of low-rank products.

    Per LoRA module the update of client ``i`` is ``dW_i = B_i A_i - B0_i A0_i`` (``B0, A0``:
    what it started from; any rank, so clients of different ranks compare as functions, not
    as padded factors); per dense key it is the tensor's change. The ``n x n`` squared
    Frobenius distances are computed from factor Gram matrices, never forming ``dW_i``
    (``O(n^2 r^2 (d + k))`` work, ``O(n r (d + k))`` memory per module). Each module's matrix
    is divided by its median off-diagonal entry, so every module counts alike whatever its
    size, and the matrices are summed.

    Returns:
        ``(distances, modules)``: the float64 ``(n, n)`` sum, and the modules it covers.
    """
    from aggregation.lora_keys import rank_axis
    from aggregation.pairs import a_matrix, b_matrix, lora_pairs

    n = len(updates)
    if n != len(origins) or n < 1:
        raise ValueError(f"{n} updates but {len(origins)} origins")
    keys = sorted(updates[0])
    pairs = lora_pairs(keys)
    total = torch.zeros(n, n, dtype=torch.float64)
    names = []

    def add(gram: Tensor, name: str) -> None:
        diag = gram.diagonal()
        dist = (diag[:, None] + diag[None, :] - 2 * gram).clamp(min=0)
        off = dist[~torch.eye(n, dtype=torch.bool)]
        scale = float(off.median()) if off.numel() else 0.0
        total.add_(dist / scale if scale > 0 else dist)
        names.append(name)

    for module, (ka, kb) in pairs.items():
        # dW_i = P_i Q_i with P_i = [B_i, -B0_i], Q_i = [A_i; A0_i], zero-padded to one width
        # (padding adds nothing to a product); <dW_i, dW_j> = sum((P_i^T P_j) * (Q_i Q_j^T))
        p = _stack_padded(
            [
                torch.cat([b_matrix(u[kb]).double(), -b_matrix(o[kb]).double()], dim=1)
                for u, o in zip(updates, origins)
            ],
            axis=1,
        )
        q = _stack_padded(
            [
                torch.cat([a_matrix(u[ka]).double(), a_matrix(o[ka]).double()], dim=0)
                for u, o in zip(updates, origins)
            ],
            axis=0,
        )
        gram = torch.empty(n, n, dtype=torch.float64)
        for i in range(n):  # one row at a time: O(n r^2) memory, not O(n^2 r^2)
            ptp = torch.einsum("dr,jds->jrs", p[i], p)
            qqt = torch.einsum("rk,jsk->jrs", q[i], q)
            gram[i] = (ptp * qqt).sum(dim=(1, 2))
        add(gram, module)
    for k in keys:
        if rank_axis(k) is None:
            flat = torch.stack(
                [(u[k].double() - o[k].double()).reshape(-1) for u, o in zip(updates, origins)]
            )
            add(flat @ flat.T, k)
    return total, names


def _stack_padded(mats: list[Tensor], axis: int) -> Tensor:
    """Stack matrices whose size differs along ``axis``, zero-padded to the largest."""
    width = max(m.shape[axis] for m in mats)
    out = []
    for m in mats:
        pad_by = width - m.shape[axis]
        out.append(torch.nn.functional.pad(m, (0, pad_by) if axis == 1 else (0, 0, 0, pad_by)))
    return torch.stack(out)


def product_outliers(distances: Tensor, threshold: float) -> tuple[list[float], list[int]]:
    """fedsim's rank-aware rule: score each client by its median distance to the others and
    reject those scoring above ``threshold`` times the median score.

    At most ``ceil(n / 2) - 1`` clients are rejected (the worst-scored first), so the rule
    never drops a majority; with fewer than 3 clients nothing is rejected (no majority to
    compare with).

    Returns:
        ``(scores, rejected)``: each client's score, and the rejected indices (sorted).
    """
    if not (math.isfinite(threshold) and threshold > 1):
        raise ValueError(f"threshold must be a finite number above 1, got {threshold}")
    n = distances.shape[0]
    if n < 3:
        return [0.0] * n, []
    others = distances[~torch.eye(n, dtype=torch.bool)].reshape(n, n - 1)
    scores = others.median(dim=1).values  # the lower middle: an outlier cannot pull it
    bar = threshold * float(scores.median())
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    rejected = [i for i in order[: (n + 1) // 2 - 1] if float(scores[i]) > bar]
    return [float(s) for s in scores], sorted(rejected)
