"""Boundary checks: reject a client update, or a merge call, that does not fit before merging.

``check_update`` guards the server against one client's upload (wrong keys, shapes, rank,
non-finite values) and raises ``UpdateRejected`` so the caller can count and log the failure.
``check_state_tensors`` and ``check_merge_states`` guard the public merge API the same way
against what no reference state can catch: values that are not tensors, dtypes other than
float16/bfloat16/float32/float64, NaN or Inf, and clients disagreeing on a key's dtype; they
also raise ``UpdateRejected``, naming the client (or ``previous``) and the key.
``check_merge_inputs`` guards the merge functions against inconsistent arguments (a caller
bug, not a client fault) and raises a plain ``ValueError``; ``check_merge_arguments``, which it
calls first, against arguments of the wrong type (a rank given as ``"8"``, sample counts as a
generator), naming the argument and the client.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from aggregation.lora_keys import lora_rank, rank_axis

# The dtypes a LoRA state may be merged in. Integer and bool tensors cannot hold a weighted
# average, complex ones would lose their imaginary part in the real-valued accumulators, and
# float8 formats are storage formats, not ones to average in.
MERGE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


class UpdateRejected(ValueError):
    """A client update that must not be merged; the message names the key and the problem."""


def _non_finite(tensor: Tensor) -> str | None:
    """Describe the NaN and Inf values of ``tensor``, or return None when all are finite."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    nans = int(torch.isnan(tensor).sum())
    infs = int((~finite).sum()) - nans
    return f"{nans} NaN and {infs} Inf values"


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


def _unusable(tensor: Tensor) -> str | None:
    """Why a tensor holds no values a merge can read (a meta or sparse tensor), or None."""
    if tensor.is_meta:
        return "a meta tensor holds no values (load the weights before merging)"
    if tensor.layout != torch.strided:
        return f"a {tensor.layout} tensor; expected a dense one"
    return None


def _check_state_structure(state: Mapping[str, Tensor], who: str) -> None:
    """The checks of :func:`check_state_tensors` that read no tensor's values: a mapping, of
    string keys, to dense tensors that hold values."""
    if not isinstance(state, Mapping):
        raise UpdateRejected(f"{who}: expected a mapping of tensors, got {type(state).__name__}")
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise UpdateRejected(f"{who}: key {key!r}: expected a str (peft's key names)")
        if not isinstance(tensor, Tensor):
            raise UpdateRejected(f"{who}: {key}: expected a tensor, got {type(tensor).__name__}")
        problem = _unusable(tensor)
        if problem is not None:
            raise UpdateRejected(f"{who}: {key}: {problem}")


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
            the reference; a tensor's dtype differs from the reference's; or a tensor holds
            NaN or Inf.
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
        unusable = _unusable(tensor)
        if unusable is not None:
            raise UpdateRejected(f"{key}: {unusable}")
        if tensor.dtype != ref.dtype:
            raise UpdateRejected(
                f"{key}: dtype {tensor.dtype} differs from the global adapter's {ref.dtype}"
            )
        expected = _expected_shape(key, ref, rank)
        if tuple(tensor.shape) != expected:
            raise UpdateRejected(
                f"{key}: shape {tuple(tensor.shape)} does not match expected {expected} "
                f"for rank {rank}"
            )
        problem = _non_finite(tensor)
        if problem is not None:
            raise UpdateRejected(f"{key}: {problem}")


def check_state_tensors(state: Mapping[str, Tensor], who: str) -> None:
    """Check that every value of ``state`` is a finite tensor of a dtype the mergers accept.

    Args:
        state: A LoRA state dict (a client's upload or a previous global state).
        who: How messages name the state, e.g. ``"client 1"`` or ``"previous"``.

    Raises:
        UpdateRejected: If ``state`` is not a mapping; a key is not a string; a value is not a
            ``torch.Tensor``, or is a meta or sparse tensor; a tensor's dtype is not one of
            ``MERGE_DTYPES`` (float16, bfloat16, float32, float64: integer, bool, complex and
            float8 are rejected); or a tensor holds NaN or Inf (both are counted). The
            message starts with ``"{who}: {key}: "``.
    """
    _check_state_structure(state, who)
    names = ", ".join(str(dtype).removeprefix("torch.") for dtype in MERGE_DTYPES)
    for key, tensor in state.items():
        if tensor.dtype not in MERGE_DTYPES:
            raise UpdateRejected(
                f"{who}: {key}: dtype {tensor.dtype} cannot be merged; expected one of {names}"
            )
        problem = _non_finite(tensor)
        if problem is not None:
            raise UpdateRejected(f"{who}: {key}: {problem}")


def check_merge_states(
    states: Sequence[Mapping[str, Tensor]], previous: Mapping[str, Tensor] | None = None
) -> dict[str, torch.dtype]:
    """Check every client's tensors (and ``previous``'s) and that clients agree on dtypes.

    Keys may differ in dtype within one state (e.g. float32 factors beside a bfloat16 dense
    head); one key must have one dtype across all clients. ``previous`` may have other dtypes:
    it is the server's own state, which the caller casts to the clients' dtype.

    Args:
        states: The clients' state dicts, in client order.
        previous: The previous global state, if the merge is given one.

    Returns:
        The clients' common dtype of each key of client 0 (empty when ``states`` is).

    Raises:
        UpdateRejected: If a client's or ``previous``'s state fails ``check_state_tensors``
            (the message names ``"client {i}"`` or ``"previous"`` and the key), or client
            ``i``'s tensor of a key has another dtype than client 0's (both are named).
    """
    for index, state in enumerate(states):
        check_state_tensors(state, f"client {index}")
    if previous is not None:
        check_state_tensors(previous, "previous")
    if not states:
        return {}
    dtypes = {key: tensor.dtype for key, tensor in states[0].items()}
    for index, state in enumerate(states[1:], start=1):
        for key, tensor in state.items():
            # A key client 0 lacks is a key mismatch, reported by check_merge_inputs.
            expected = dtypes.get(key)
            if expected is not None and tensor.dtype != expected:
                raise UpdateRejected(
                    f"client {index}: {key}: dtype {tensor.dtype} differs from client 0's "
                    f"{expected}; all clients must send one dtype per key"
                )
    return dtypes


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


def _per_client(value: object, name: str) -> None:
    """``value`` must hold one entry per client: a list, tuple, array or tensor."""
    if (
        isinstance(value, (str, bytes, Mapping))
        or not hasattr(value, "__len__")
        or not hasattr(value, "__getitem__")
    ):
        raise ValueError(
            f"{name}: expected a list with one entry per client, got {type(value).__name__}"
        )


def _as_int(value: object) -> int | None:
    """``value`` as an int (an int, a numpy integer, a one-element integer tensor), or None."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_count(value: object) -> bool:
    """Whether ``value`` is a real number (numpy and one-element tensors too), not a bool."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_merge_arguments(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    global_rank: int | None = None,
) -> None:
    """Check the types of a merge call's arguments before anything reads them.

    Args:
        states: The clients' state dicts.
        ranks: Each client's declared LoRA rank.
        num_samples: Each client's number of training samples.
        global_rank: The global rank ``R``, or None.

    Raises:
        ValueError: Naming the argument: ``states``, ``ranks`` or ``num_samples`` is not a
            list (a generator, a dict, a string, a number); a rank is not an int
            (``ranks[1]: expected an int, got str '8'``); a sample count is not a number; or
            ``global_rank`` is neither None nor an int.
    """
    for name, value in (("states", states), ("ranks", ranks), ("num_samples", num_samples)):
        _per_client(value, name)
    for index, rank in enumerate(ranks):
        if _as_int(rank) is None:
            raise ValueError(f"ranks[{index}]: expected an int, got {type(rank).__name__} {rank!r}")
    for index, count in enumerate(num_samples):
        if not _is_count(count):
            raise ValueError(
                f"num_samples[{index}]: expected a number, got {type(count).__name__} {count!r}"
            )
    if global_rank is not None and _as_int(global_rank) is None:
        raise ValueError(
            f"global_rank: expected an int or None, got {type(global_rank).__name__} "
            f"{global_rank!r}"
        )


def check_client_arguments(state: Mapping[str, Tensor], rank: int, num_samples: float) -> None:
    """Check the types of one client's arguments to a streaming merge (``StreamingMerge.add``).

    Raises:
        ValueError: ``rank`` is not an int or ``num_samples`` not a number (each named).
        UpdateRejected: ``state`` is not a mapping of string keys to dense tensors that hold
            values (the message starts with ``"state: "`` and names the key).
    """
    if _as_int(rank) is None:
        raise ValueError(f"rank: expected an int, got {type(rank).__name__} {rank!r}")
    if not _is_count(num_samples):
        raise ValueError(
            f"num_samples: expected a number, got {type(num_samples).__name__} {num_samples!r}"
        )
    _check_state_structure(state, "state")


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
        ValueError: If an argument has the wrong type (see ``check_merge_arguments``); the
            three sequences differ in length or are empty; a sample count is not positive and
            finite; a rank is outside ``[1, global_rank]``; a state's tensors do not have its
            declared rank; clients disagree on keys or non-rank shapes; or ``previous`` lacks
            a LoRA key, has other shapes, or a rank above ``global_rank``.
        UpdateRejected: If a state (or ``previous``) is not a mapping of string keys to dense
            tensors that hold values (a meta tensor has none); names the client and the key.
    """
    check_merge_arguments(states, ranks, num_samples, global_rank)
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
    for index, state in enumerate(states):
        _check_state_structure(state, f"client {index}")
    if previous is not None:
        _check_state_structure(previous, "previous")
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
