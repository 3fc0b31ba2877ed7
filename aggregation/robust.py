"""Robust aggregation rules (ALGORITHMS 4b) on client updates in one aligned space.

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
