"""LoRA key names and the rank axis: which tensors carry a rank and how to cut or pad it.

peft names the two LoRA factors of a module ``<module>.lora_A.weight`` (``r x k``, or
``r x k x 1 x 1`` for a 1x1 conv) and ``<module>.lora_B.weight`` (``d x r``, or ``d x r x 1 x 1``).
The rank axis is dim 0 of ``lora_A`` and dim 1 of ``lora_B``. Every other key is "dense": it
has no rank axis and is never truncated or padded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# An optional adapter-name segment ("lora_A.default.weight") is accepted so that keys taken
# from a model's own state_dict are classified the same way as peft's stripped keys.
_LORA_A = re.compile(r"(?:^|\.)lora_A(?:\.[^.]+)?\.weight$")
_LORA_B = re.compile(r"(?:^|\.)lora_B(?:\.[^.]+)?\.weight$")


def is_lora_a(key: str) -> bool:
    """Tell whether ``key`` names a LoRA down-projection (``lora_A``) weight.

    Args:
        key: A state-dict key.

    Returns:
        True for ``...lora_A.weight`` (optionally ``...lora_A.<adapter>.weight``).
    """
    return _LORA_A.search(key) is not None


def is_lora_b(key: str) -> bool:
    """Tell whether ``key`` names a LoRA up-projection (``lora_B``) weight.

    Args:
        key: A state-dict key.

    Returns:
        True for ``...lora_B.weight`` (optionally ``...lora_B.<adapter>.weight``).
    """
    return _LORA_B.search(key) is not None


def is_lora(key: str) -> bool:
    """Tell whether ``key`` names a LoRA factor (``lora_A`` or ``lora_B``).

    Args:
        key: A state-dict key.

    Returns:
        True when the tensor has a rank axis.
    """
    return is_lora_a(key) or is_lora_b(key)


def rank_axis(key: str) -> int | None:
    """Return the dimension holding the LoRA rank for ``key``.

    Args:
        key: A state-dict key.

    Returns:
        0 for ``lora_A``, 1 for ``lora_B``, None for a dense tensor.
    """
    if is_lora_a(key):
        return 0
    if is_lora_b(key):
        return 1
    return None


def lora_rank(state: Mapping[str, Tensor]) -> int:
    """Return the LoRA rank shared by every ``lora_A``/``lora_B`` tensor of ``state``.

    Args:
        state: A LoRA state dict.

    Returns:
        The common size of the rank axis.

    Raises:
        ValueError: If ``state`` has no LoRA tensor, or its LoRA tensors disagree on the rank
            (the message names one key per rank found).
    """
    ranks: dict[int, str] = {}
    for key, tensor in state.items():
        axis = rank_axis(key)
        if axis is None:
            continue
        if tensor.dim() <= axis:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} has no rank axis {axis}")
        ranks.setdefault(int(tensor.shape[axis]), key)
    if not ranks:
        raise ValueError("state has no lora_A/lora_B tensors, so it has no rank")
    if len(ranks) > 1:
        found = ", ".join(f"{key} has rank {rank}" for rank, key in sorted(ranks.items()))
        raise ValueError(f"LoRA tensors disagree on the rank: {found}")
    return next(iter(ranks))


def truncate_tensor(key: str, tensor: Tensor, rank: int) -> Tensor:
    """Keep the first ``rank`` dimensions of one tensor (a copy; dense tensors are copied whole).

    Args:
        key: The tensor's state-dict key, which decides its rank axis.
        tensor: The tensor.
        rank: The rank to keep, ``1 <= rank <=`` the tensor's rank.

    Returns:
        A new tensor not sharing storage with ``tensor``.

    Raises:
        ValueError: If ``rank`` is outside ``[1, current rank]``.
    """
    axis = rank_axis(key)
    if axis is None:
        return tensor.clone()
    current = tensor.shape[axis]
    if not 1 <= rank <= current:
        raise ValueError(f"{key}: cannot truncate rank {current} to {rank}")
    return tensor.narrow(axis, 0, rank).clone()


def pad_tensor(key: str, tensor: Tensor, rank: int) -> Tensor:
    """Zero-pad one tensor's rank axis up to ``rank`` (a copy; dense tensors are copied whole).

    Args:
        key: The tensor's state-dict key, which decides its rank axis.
        tensor: The tensor.
        rank: The target rank, at least the tensor's rank.

    Returns:
        A new tensor whose dimensions past the original rank are zero.

    Raises:
        ValueError: If ``rank`` is below the tensor's rank.
    """
    axis = rank_axis(key)
    if axis is None:
        return tensor.clone()
    current = tensor.shape[axis]
    if rank < current:
        raise ValueError(f"{key}: cannot pad rank {current} down to {rank}")
    shape = list(tensor.shape)
    shape[axis] = rank
    out = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    out.narrow(axis, 0, current).copy_(tensor)
    return out


def truncate(state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Cut a state dict down to ``rank``: ``A[:rank]``, ``B[:, :rank]``, dense tensors unchanged.

    This is the default redistribution rule (docs/algorithms.md §0.3).

    Args:
        state: A LoRA state dict of rank at least ``rank``.
        rank: The rank to keep.

    Returns:
        A new dict of new tensors, in the key order of ``state``.

    Raises:
        ValueError: If ``rank`` is outside ``[1, rank of state]``.
    """
    return {key: truncate_tensor(key, tensor, rank) for key, tensor in state.items()}


def pad(state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Zero-pad a state dict up to ``rank``: extra ``A`` rows and ``B`` columns are zero.

    Args:
        state: A LoRA state dict of rank at most ``rank``.
        rank: The target rank.

    Returns:
        A new dict of new tensors, in the key order of ``state``; dense tensors unchanged.

    Raises:
        ValueError: If ``rank`` is below the rank of a LoRA tensor of ``state``.
    """
    return {key: pad_tensor(key, tensor, rank) for key, tensor in state.items()}


def default_global_rank(ranks: Sequence[int], previous: Mapping[str, Tensor] | None = None) -> int:
    """Return the global rank ``R``: the largest client rank, or the previous global's if larger.

    Args:
        ranks: The sampled clients' ranks.
        previous: The previous global state, if any; a round that samples only low-rank
            clients must not shrink the global adapter.

    Returns:
        ``max(*ranks, rank of previous)``, or 0 when both are empty (callers reject that).

    Raises:
        ValueError: If ``previous`` has no consistent rank.
    """
    previous_rank = lora_rank(previous) if previous is not None else 0
    return max([*ranks, previous_rank], default=0)
