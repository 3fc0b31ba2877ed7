"""Boundary checks on client updates (``check_update``) and merge arguments."""

import re

import pytest
import torch
from lora_builders import CONV, HEAD_B, HEAD_W, QUERY, build_state, lora_a, lora_b

from aggregation import UpdateRejected, check_merge_inputs, check_update, truncate

REFERENCE = build_state(8, seed=0)


def _update(rank: int = 4) -> dict:
    return build_state(rank, seed=1)


def _rejects(state: dict, rank: int, *fragments: str) -> None:
    with pytest.raises(UpdateRejected) as info:
        check_update(state, REFERENCE, rank)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_valid_update_passes(rank: int) -> None:
    assert check_update(truncate(REFERENCE, rank), REFERENCE, rank) is None
    assert check_update(_update(rank), REFERENCE, rank) is None
    # the same tensors declared at another rank are not a valid update: the check looks
    other = rank + 1 if rank < 8 else rank - 1
    _rejects(_update(rank), other, "shape", f"for rank {other}")


def test_update_rejected_is_a_value_error() -> None:
    assert issubclass(UpdateRejected, ValueError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", [lora_a(QUERY), lora_b(CONV), HEAD_B])
def test_non_finite_values_are_rejected(bad: float, key: str) -> None:
    state = _update()
    state[key] = state[key].clone()
    state[key].view(-1)[0] = bad
    kind = "1 NaN" if bad != bad else "1 Inf"
    _rejects(state, 4, key, kind)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64, torch.bool])
def test_a_dtype_other_than_the_global_adapters_is_rejected(dtype: torch.dtype) -> None:
    state = _update()
    state[lora_a(QUERY)] = state[lora_a(QUERY)].to(dtype)
    _rejects(state, 4, lora_a(QUERY), str(dtype), "torch.float32")


def test_wrong_lora_a_shape_is_rejected() -> None:
    state = _update()
    state[lora_a(QUERY)] = torch.zeros(4, 6)
    _rejects(state, 4, lora_a(QUERY), "(4, 6)", "(4, 5)")


def test_wrong_conv_lora_b_shape_is_rejected() -> None:
    state = _update()
    state[lora_b(CONV)] = torch.zeros(4, 4)
    _rejects(state, 4, lora_b(CONV), "(4, 4, 1, 1)")


def test_tensors_of_another_rank_than_declared_are_rejected() -> None:
    _rejects(_update(4), 2, "for rank 2", lora_a(QUERY))


def test_dense_shape_is_rejected() -> None:
    state = _update()
    state[HEAD_W] = torch.zeros(3, 7)
    _rejects(state, 4, HEAD_W, "(3, 6)")


@pytest.mark.parametrize("rank", [0, -1, 9])
def test_rank_out_of_range_is_rejected(rank: int) -> None:
    _rejects(_update(), rank, f"rank {rank}", "[1, 8]")


def test_missing_and_unexpected_keys_are_named() -> None:
    state = _update()
    del state[lora_b(QUERY)]
    state["base_model.model.pooler.weight"] = torch.zeros(2)
    _rejects(state, 4, "missing keys", lora_b(QUERY), "unexpected keys", "pooler.weight")


def _states(*ranks: int) -> list[dict]:
    return [build_state(rank, seed=index) for index, rank in enumerate(ranks)]


@pytest.mark.parametrize(
    ("states", "ranks", "num_samples", "global_rank", "message"),
    [
        (_states(4, 2), [4], [1, 1], 4, "2 states, 1 ranks and 2 sample counts"),
        ([], [], [], 4, "zero clients"),
        (_states(4), [4], [0], 4, "client 0: num_samples must be positive"),
        (_states(4), [4], [-3], 4, "num_samples must be positive"),
        (_states(4), [4], [float("nan")], 4, "num_samples must be positive"),
        (_states(4, 8), [4, 8], [1, 1], 4, "client 1: rank 8 is outside [1, 4]"),
        (_states(4, 2), [4, 4], [1, 1], 4, "client 1: declared rank 4 but its tensors have 2"),
        (_states(4), [4], [1], 0, "global_rank must be at least 1"),
    ],
)
def test_check_merge_inputs_messages(
    states: list, ranks: list, num_samples: list, global_rank: int, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_merge_inputs(states, ranks, num_samples, global_rank)


def test_check_merge_inputs_names_key_differences() -> None:
    states = _states(4, 4)
    del states[1][HEAD_B]
    with pytest.raises(ValueError, match="client 1 has different keys") as info:
        check_merge_inputs(states, [4, 4], [1, 1], 4)
    assert HEAD_B in str(info.value)


def test_check_merge_inputs_names_shape_differences() -> None:
    states = _states(4, 4)
    states[1][HEAD_W] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=re.escape(f"{HEAD_W}: client 1 has shape (3, 2)")):
        check_merge_inputs(states, [4, 4], [1, 1], 4)


def test_check_merge_inputs_checks_previous() -> None:
    previous = {k: v for k, v in build_state(4, seed=9).items() if k != lora_a(CONV)}
    with pytest.raises(ValueError, match="lacks LoRA key"):
        check_merge_inputs(_states(4), [4], [1], 4, previous)
