"""Stack clients' tensors on a shared rank axis so per-dimension weights apply in one einsum.

Every merge rule in this package is a weighted sum over clients. Putting each client's tensor
rank-axis-first and zero-padded to the global rank ``R`` gives one ``(|S|, R, ...)`` block per
key, and a ``(|S|, R)`` weight matrix then expresses zero-padding FedAvg (constant columns) and
FediLoRA (per-dimension weights) alike, with no loop over dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from aggregation.lora_keys import rank_axis


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """Pick the dtype to sum client tensors in: float64 if any input is, else float32.

    Summing half-precision tensors in their own dtype loses several bits per client, so
    low-precision inputs are accumulated in float32 and cast back afterwards.

    Args:
        tensors: The clients' tensors for one key.

    Returns:
        ``torch.float64`` or ``torch.float32``.
    """
    if any(tensor.dtype == torch.float64 for tensor in tensors):
        return torch.float64
    return torch.float32


def sample_weights(num_samples: Sequence[float]) -> Tensor:
    """Turn sample counts into FedAvg weights ``p_i = n_i / sum_j n_j``.

    Args:
        num_samples: Positive sample counts, one per client.

    Returns:
        A float64 vector of shape ``(|S|,)`` summing to 1.
    """
    counts = torch.as_tensor(num_samples, dtype=torch.float64)
    return counts / counts.sum()


def stack_rank_first(key: str, tensors: Sequence[Tensor], rank: int, dtype: torch.dtype) -> Tensor:
    """Stack one LoRA key's client tensors rank-axis-first, zero-padded to ``rank``.

    Args:
        key: A ``lora_A`` or ``lora_B`` key, which decides the rank axis.
        tensors: The clients' tensors for ``key``, each of rank at most ``rank``.
        rank: The global rank ``R``.
        dtype: The dtype of the stacked block.

    Returns:
        A new tensor of shape ``(|S|, R, *rest)``; ``rest`` is the tensor shape without its
        rank axis (``(k, ...)`` for ``lora_A``, ``(d, ...)`` for ``lora_B``).

    Raises:
        ValueError: If ``key`` is not a LoRA key.
    """
    axis = rank_axis(key)
    if axis is None:
        raise ValueError(f"{key} is not a lora_A/lora_B key")
    first = tensors[0].movedim(axis, 0)
    out = first.new_zeros((len(tensors), rank, *first.shape[1:]), dtype=dtype)
    for index, tensor in enumerate(tensors):
        rank_first = tensor.movedim(axis, 0)  # (r_i, *rest)
        out[index, : rank_first.shape[0]] = rank_first
    return out


def restore_rank_axis(key: str, rank_first: Tensor) -> Tensor:
    """Undo ``stack_rank_first``'s axis move for one merged tensor.

    Args:
        key: The LoRA key the tensor belongs to.
        rank_first: A merged tensor of shape ``(R, *rest)``.

    Returns:
        A contiguous tensor in peft's layout (``R x k ...`` or ``d x R ...``).

    Raises:
        ValueError: If ``key`` is not a LoRA key.
    """
    axis = rank_axis(key)
    if axis is None:
        raise ValueError(f"{key} is not a lora_A/lora_B key")
    return rank_first.movedim(0, axis).contiguous()


def weighted_rank_sum(stacked: Tensor, weights: Tensor) -> Tensor:
    """Sum clients with a per-client, per-dimension weight: ``out[j] = sum_i w[i, j] x[i, j]``.

    Args:
        stacked: Client block of shape ``(|S|, R, *rest)``.
        weights: Weights of shape ``(|S|, R)``.

    Returns:
        The merged tensor, shape ``(R, *rest)``, in ``stacked``'s dtype.
    """
    weights = weights.to(device=stacked.device, dtype=stacked.dtype)
    return torch.einsum("sr,sr...->r...", weights, stacked)


def weighted_average(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Average same-shaped client tensors with one weight per client (dense tensors).

    Args:
        tensors: The clients' tensors for one key, all of one shape.
        weights: Weights of shape ``(|S|,)``.

    Returns:
        ``sum_i w_i x_i`` in the first tensor's dtype.
    """
    dtype = accumulation_dtype(tensors)
    stacked = torch.stack([tensor.to(dtype) for tensor in tensors])  # (|S|, *shape)
    merged = torch.tensordot(weights.to(device=stacked.device, dtype=dtype), stacked, dims=1)
    return merged.to(tensors[0].dtype)


def with_dense_average(
    states: Sequence[Mapping[str, Tensor]], merged: dict[str, Tensor], weights: Tensor
) -> dict[str, Tensor]:
    """``merged`` (the merged LoRA factors) completed with the dense keys (no rank axis:
    heads, norms) averaged with ``weights``, in the clients' key order.

    Args:
        states: The clients' state dicts (same keys).
        merged: The merged tensors of the LoRA keys (filled in place).
        weights: One weight per client, shape ``(|S|,)``.
    """
    for key in states[0]:
        if rank_axis(key) is None:
            merged[key] = weighted_average([state[key] for state in states], weights)
    return {key: merged[key] for key in states[0]}
