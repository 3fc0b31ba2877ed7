"""SCAFFOLD control variates (docs/algorithms.md §3.3): the client and server variate updates.

A client corrects its local gradient to ``g - c_i + c``; after ``K`` local steps at learning
rate ``η_l`` it sets ``c_i+ = c_i - c + (θ_g - θ_i) / (K η_l)`` and uploads ``Δc_i = c_i+ - c_i``.
The server sets ``c ← c + (|S|/N) mean_i Δc_i``.

With heterogeneous ranks a client works in its rank-``r_i`` view: ``c`` and ``θ_g`` are the
truncations it received, and its ``Δc_i`` has rank ``r_i``. The server zero-pads each ``Δc_i``
to the global rank before averaging: a client's variate has no component in the dimensions it
does not train (its gradient there is identically zero), so zero, not "missing", is the right
value, and the mean stays over all ``|S|`` sampled clients as in the published update.
Variates are computed and returned in float32 (float64 if an input is): they are small
differences that half precision would round away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from aggregation.lora_keys import lora_rank, pad, rank_axis
from aggregation.stacking import accumulation_dtype


def _same_keys_and_shapes(
    name: str, state: Mapping[str, Tensor], ref: Mapping[str, Tensor]
) -> None:
    if set(state) != set(ref):
        missing = sorted(set(ref) - set(state))
        extra = sorted(set(state) - set(ref))
        raise ValueError(f"{name}: missing keys {missing}, unexpected keys {extra}")
    for key, tensor in ref.items():
        if state[key].shape != tensor.shape:
            raise ValueError(
                f"{name}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
            )


def scaffold_client_variate(
    c_i: Mapping[str, Tensor] | None,
    c: Mapping[str, Tensor] | None,
    theta_g: Mapping[str, Tensor],
    theta_i: Mapping[str, Tensor],
    steps: int,
    lr: float,
) -> dict[str, Tensor]:
    """Compute a client's new control variate ``c_i+ = c_i - c + (θ_g - θ_i) / (K η_l)``.

    Every argument is in the client's rank-``r_i`` view (``c`` and ``θ_g`` truncated to
    ``r_i``) and has the keys of ``theta_i``.

    Args:
        c_i: The client's previous variate; None means zero (first participation).
        c: The server variate the client received; None means zero.
        theta_g: The global state the client started this round from.
        theta_i: The client's state after local training.
        steps: The number of local steps ``K`` (at least 1).
        lr: The local learning rate ``η_l`` (positive).

    Returns:
        A new dict keyed like ``theta_i``, in float32 (float64 if an input is).

    Raises:
        ValueError: If ``steps < 1``, ``lr`` is not positive, or a mapping's keys or shapes
            differ from ``theta_i``'s.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    _same_keys_and_shapes("theta_g", theta_g, theta_i)
    for name, variate in (("c_i", c_i), ("c", c)):
        if variate is not None:
            _same_keys_and_shapes(name, variate, theta_i)
    scale = 1.0 / (steps * lr)
    out: dict[str, Tensor] = {}
    for key, local in theta_i.items():
        parts = [local, theta_g[key], *(v[key] for v in (c_i, c) if v is not None)]
        dtype = accumulation_dtype(parts)
        value = (theta_g[key].to(dtype) - local.to(dtype)) * scale
        if c_i is not None:
            value = value + c_i[key].to(dtype)
        if c is not None:
            value = value - c[key].to(dtype)
        out[key] = value
    return out


def scaffold_server_variate(
    c: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_clients_total: int,
    global_rank: int,
) -> dict[str, Tensor]:
    """Update the server variate: ``c + (|S|/N) mean_i pad(Δc_i, R)``.

    Args:
        c: The current server variate at the global rank ``R``.
        deltas: Each sampled client's ``Δc_i = c_i+ - c_i`` at its rank ``r_i``, keyed like
            ``c``.
        ranks: Each client's rank ``r_i`` (checked against its LoRA tensors, if any).
        num_clients_total: The number of clients ``N`` in the federation (at least ``|S|``).
        global_rank: The global rank ``R``.

    Returns:
        A new dict keyed like ``c``, in float32 (float64 if an input is).

    Raises:
        ValueError: If there is no delta, lengths differ, ``N < |S|``, a rank is outside
            ``[1, R]`` or does not match its delta, or keys or padded shapes differ from ``c``.
    """
    if not deltas:
        raise ValueError("need at least one client delta")
    if len(deltas) != len(ranks):
        raise ValueError(f"got {len(deltas)} deltas and {len(ranks)} ranks")
    if num_clients_total < len(deltas):
        raise ValueError(
            f"num_clients_total {num_clients_total} is below the {len(deltas)} sampled clients"
        )
    padded = []
    for index, (delta, rank) in enumerate(zip(deltas, ranks, strict=True)):
        if not 1 <= rank <= global_rank:
            raise ValueError(f"client {index}: rank {rank} is outside [1, {global_rank}]")
        if any(rank_axis(key) is not None for key in delta) and lora_rank(delta) != rank:
            raise ValueError(f"client {index}: declared rank {rank} but its delta has another")
        full = pad(delta, global_rank)
        _same_keys_and_shapes(f"client {index} delta", full, c)
        padded.append(full)
    fraction = len(deltas) / num_clients_total
    out: dict[str, Tensor] = {}
    for key, current in c.items():
        parts = [current, *(delta[key] for delta in padded)]
        dtype = accumulation_dtype(parts)
        stacked = torch.stack([delta[key].to(dtype) for delta in padded])  # (|S|, *shape)
        out[key] = current.to(dtype) + fraction * stacked.mean(dim=0)
    return out
