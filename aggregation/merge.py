"""One-call merge of heterogeneous-rank LoRA state dicts: validate, fold scaling, merge, cast.

This is the public entry point for callers outside the engine. It checks what the engine's
server checks per upload (``check_update``) that a merge can check without a reference state:
tensors only, floating dtypes only, finite values, one dtype per key across clients.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from aggregation.registry import get_merger, merger_class
from aggregation.scaling import fold_scaling
from aggregation.validate import check_merge_arguments, check_merge_states


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a key is folded and merged in: float32 for half precision, else its own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_scalings(scalings: Sequence[float], count: int) -> None:
    if isinstance(scalings, (str, bytes, Mapping)) or not hasattr(scalings, "__len__"):
        raise ValueError(
            f"scalings: expected a list with one entry per client, got {type(scalings).__name__}"
        )
    if len(scalings) != count:
        raise ValueError(f"got {len(scalings)} scalings for {count} states")
    for index, scaling in enumerate(scalings):
        if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
            raise ValueError(
                f"scalings[{index}]: expected a number, got {type(scaling).__name__} {scaling!r}"
            )
        if not (math.isfinite(scaling) and scaling != 0):
            raise ValueError(
                f"client {index}: LoRA scaling must be finite and non-zero, got {scaling}"
            )


def _cast(state: Mapping[str, Tensor], dtypes: Mapping[str, torch.dtype]) -> dict[str, Tensor]:
    """Cast each key listed in ``dtypes`` to its dtype (no copy when it already has it)."""
    return {
        key: tensor.to(dtypes[key]) if key in dtypes else tensor for key, tensor in state.items()
    }


def merge_lora_state_dicts(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[int],
    *,
    method: str = "fedilora",
    previous: Mapping[str, Tensor] | None = None,
    global_rank: int | None = None,
    scalings: Sequence[float] | None = None,
    empty_dim: str = "keep",
    svd: str = "auto",
    partition_weights: str = "samples",
) -> dict[str, Tensor]:
    """Merge clients' LoRA adapters of different ranks into one global adapter.

    When ``scalings`` are given (peft's per-client ``s_i = alpha_i / r_i``), each client's
    ``lora_B`` is multiplied by ``s_i`` before merging, so the result is in the "s = 1" space:
    it means ``dW = B_g @ A_g``, and ``previous`` must be in that space too. Hand it back to
    client ``i`` with ``unfold_scaling(redistributed, s_i)``. Without ``scalings`` the states
    are merged as given, which is right when every client uses the same constant scaling.

    Dtypes: every tensor must be float16, bfloat16, float32 or float64, and all clients must
    send a key in one dtype (different keys may differ, e.g. float32 factors and a bfloat16
    head). Each key of the result has that common dtype, for every method. Half-precision keys
    are folded and merged in float32 and cast back once at the end. ``previous`` may have
    other floating dtypes: each of its keys is cast to the clients' dtype of that key first.

    Args:
        states: The sampled clients' LoRA state dicts (peft keys, same key set).
        ranks: Each client's LoRA rank; must match its tensors.
        num_samples: Each client's number of training samples (positive).
        method: A merge method registered in ``MERGERS`` (``"fedilora"``, ``"zeropad"``,
            ``"hetlora"``, ``"flexlora"``, ``"flora"``, ``"raflora"``, ...).
        previous: The previous global adapter (used by FediLoRA and raFLoRA for uncovered
            dimensions).
            It is validated like a client's state even by methods that do not read it.
        global_rank: The global rank ``R``; defaults to ``max(ranks)``, or the rank of
            ``previous`` if larger. Methods without a fixed rank (FLoRA, whose global rank is
            ``sum(ranks)``) ignore it and ``previous``.
        scalings: Optional per-client peft scaling ``s_i``, folded into ``lora_B``.
        empty_dim: FediLoRA's and raFLoRA's rule for a dimension no client covers: ``"keep"``
            its previous value or ``"zero"`` it; ignored by methods that take no such option.
        svd: FlexLoRA's and raFLoRA's factorisation, ``"exact"``, ``"lowrank"`` or
            ``"auto"``; ignored by methods that take no such option.
        partition_weights: raFLoRA's weights within a rank partition, ``"samples"`` or
            ``"clients"``; ignored by methods that take no such option.

    Returns:
        A new global state dict (rank ``R``, or ``sum(ranks)`` for FLoRA) with client 0's
        keys; each tensor has the clients' common dtype of its key. Inputs are not mutated.

    Raises:
        UpdateRejected: If a client's state (or ``previous``) is not a mapping, has a key
            that is not a string, or holds a value that is not a tensor, a meta or sparse
            tensor, a tensor that is not float16/bfloat16/float32/float64 (integer, bool and
            complex are rejected), or a NaN or Inf; or client ``i`` sends a key in another
            dtype than client 0. The message names ``"client {i}"`` (or ``"previous"``), the
            key and the problem. ``UpdateRejected`` is a ``ValueError``.
        ValueError: If an argument has the wrong type (``states``, ``ranks`` or
            ``num_samples`` no list, a rank no int, a count or scaling no number, named with
            its index: ``ranks[1]: expected an int, got str '8'``), ``method`` is unknown
            (valid names are listed), ``scalings`` has the wrong length or holds a zero or
            non-finite value, ``empty_dim``, ``svd`` or ``partition_weights`` is
            invalid, the inputs are inconsistent (see ``RankMerger.merge``), or a merged key
            does not fit its dtype (e.g. a large ``s_i`` pushes a float16 ``lora_B`` past
            65504).
    """
    check_merge_arguments(states, ranks, num_samples, global_rank)
    cls = merger_class(method)
    given = {"empty_dim": empty_dim, "svd": svd, "partition_weights": partition_weights}
    options = {name: value for name, value in given.items() if name in cls.options}
    merger = get_merger(method, **options)
    if scalings is not None:
        _check_scalings(scalings, len(states))
    dtypes = check_merge_states(states, previous)
    working = {key: _working_dtype(dtype) for key, dtype in dtypes.items()}
    states = [_cast(state, working) for state in states]
    if scalings is not None:
        states = [
            fold_scaling(state, scaling) for state, scaling in zip(states, scalings, strict=True)
        ]
    if previous is not None:
        previous = _cast(_cast(previous, dtypes), working)
    merged = merger.merge(states, ranks, num_samples, previous=previous, global_rank=global_rank)
    result = {key: tensor.to(dtypes[key]) for key, tensor in merged.items()}
    for key, tensor in result.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{key}: the merged tensor does not fit in {tensor.dtype} (finite inputs gave "
                "NaN or Inf); pass states in a wider dtype or smaller scalings"
            )
    return result
