"""Boundary checks: reject a client update, or a merge call, that does not fit before merging.

``check_update`` guards the server against one client's upload (wrong keys, shapes, rank,
non-finite values) and raises ``UpdateRejected`` so the caller can count and log the failure.
``check_merge_inputs`` guards the merge functions against inconsistent arguments (a caller
bug, not a client fault) and raises a plain ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from aggregation.lora_keys import lora_rank, rank_axis


class UpdateRejected(ValueError):
    """A client update that must not be merged; the message names the key and the problem."""


def _expected_shape(key: str, reference: Tensor, rank: int) -> tuple[int, ...]:
    shape = list(reference.shape)
    axis = rank_axis(key)
    if axis is not None:
        shape[axis] = rank
    return tuple(shape)


def _key_difference(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing keys {missing}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected}")
    return "; ".join(parts)


def check_update(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], rank: int) -> None:
    """Check a client's rank-``rank`` upload against the rank-``R`` global state.

    Args:
        state: The client's uploaded state dict.
        reference: The global state dict at the global rank ``R``, with the same keys.
        rank: The client's declared LoRA rank.

    Raises:
        UpdateRejected: If ``rank`` is outside ``[1, R]``; keys are missing or unexpected (all
            are named); a ``lora_A`` is not ``(rank, *A_ref.shape[1:])``; a ``lora_B`` is not
            ``(B_ref.shape[0], rank, *B_ref.shape[2:])``; a dense tensor's shape differs from
            the reference; or a tensor holds NaN or Inf.
        ValueError: If ``reference`` itself has no consistent rank (a server-side bug).
    """
    global_rank = lora_rank(reference)
    if not 1 <= rank <= global_rank:
        raise UpdateRejected(f"rank {rank} is outside [1, {global_rank}] (the global rank)")
    difference = _key_difference(state, reference)
    if difference:
        raise UpdateRejected(f"update keys differ from the global adapter: {difference}")
    for key, ref in reference.items():
        tensor = state[key]
        if not isinstance(tensor, Tensor):
            raise UpdateRejected(f"{key}: expected a tensor, got {type(tensor).__name__}")
        expected = _expected_shape(key, ref, rank)
        if tuple(tensor.shape) != expected:
            raise UpdateRejected(
                f"{key}: shape {tuple(tensor.shape)} does not match expected {expected} "
                f"for rank {rank}"
            )
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nans = int(torch.isnan(tensor).sum())
            infs = int((~finite).sum()) - nans
            raise UpdateRejected(f"{key}: {nans} NaN and {infs} Inf values")


def _shape_without_rank(key: str, tensor: Tensor) -> tuple[int | None, ...]:
    shape: list[int | None] = list(tensor.shape)
    axis = rank_axis(key)
    if axis is not None:
        shape[axis] = None
    return tuple(shape)


def _check_shapes_agree(
    states: Sequence[Mapping[str, Tensor]], previous: Mapping[str, Tensor] | None
) -> None:
    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        difference = _key_difference(state, first)
        if difference:
            raise ValueError(f"client {index} has different keys than client 0: {difference}")
        for key, tensor in state.items():
            if _shape_without_rank(key, tensor) != _shape_without_rank(key, first[key]):
                raise ValueError(
                    f"{key}: client {index} has shape {tuple(tensor.shape)}, "
                    f"client 0 has {tuple(first[key].shape)}"
                )
    if previous is None:
        return
    for key, tensor in first.items():
        if rank_axis(key) is None:
            continue
        if key not in previous:
            raise ValueError(f"previous global state lacks LoRA key {key}")
        if _shape_without_rank(key, previous[key]) != _shape_without_rank(key, tensor):
            raise ValueError(
                f"{key}: previous global shape {tuple(previous[key].shape)} does not fit "
                f"client shape {tuple(tensor.shape)}"
            )


def check_merge_inputs(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    global_rank: int,
    previous: Mapping[str, Tensor] | None = None,
) -> None:
    """Check that a merge call's arguments are consistent with each other.

    Args:
        states: The clients' state dicts.
        ranks: Each client's declared LoRA rank.
        num_samples: Each client's number of training samples.
        global_rank: The global rank ``R``.
        previous: The previous global state, if the merge uses it.

    Raises:
        ValueError: If the three sequences differ in length or are empty; a sample count is not
            positive and finite; a rank is outside ``[1, global_rank]``; a state's tensors do
            not have its declared rank; clients disagree on keys or non-rank shapes; or
            ``previous`` lacks a LoRA key, has other shapes, or a rank above ``global_rank``.
    """
    if not len(states) == len(ranks) == len(num_samples):
        raise ValueError(
            f"got {len(states)} states, {len(ranks)} ranks and {len(num_samples)} sample "
            "counts; need one of each per client"
        )
    if not states:
        raise ValueError("cannot merge zero clients")
    if global_rank < 1:
        raise ValueError(f"global_rank must be at least 1, got {global_rank}")
    for index, count in enumerate(num_samples):
        if not (math.isfinite(count) and count > 0):
            raise ValueError(f"client {index}: num_samples must be positive, got {count}")
    for index, (state, rank) in enumerate(zip(states, ranks, strict=True)):
        if not 1 <= rank <= global_rank:
            raise ValueError(f"client {index}: rank {rank} is outside [1, {global_rank}]")
        try:
            actual = lora_rank(state)
        except ValueError as error:
            raise ValueError(f"client {index}: {error}") from error
        if actual != rank:
            raise ValueError(f"client {index}: declared rank {rank} but its tensors have {actual}")
    if previous is not None:
        previous_rank = lora_rank(previous)
        if previous_rank > global_rank:
            raise ValueError(
                f"previous global state has rank {previous_rank} > global_rank {global_rank}"
            )
    _check_shapes_agree(states, previous)
