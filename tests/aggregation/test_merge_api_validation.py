"""``merge_lora_state_dicts`` rejects what the engine rejects, and keeps the clients' dtype."""

import re

import numpy as np
import pytest
import torch
from lora_builders import (
    CONV,
    HEAD_B,
    HEAD_W,
    QUERY,
    build_state,
    client_states,
    clone_states,
    lora_a,
    lora_b,
)

from aggregation import (
    MERGE_DTYPES,
    MERGERS,
    UpdateRejected,
    check_state_tensors,
    merge_lora_state_dicts,
)

METHODS = sorted(MERGERS)
RANKS = [4, 2]
COUNTS = [10, 30]
KEY = lora_a(QUERY)
# The tolerance of a dtype's result against the float64 merge of the same (upcast) inputs:
# a few units in the last place, since every method accumulates in float32 or float64.
TOLERANCE = {
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}


def _merge(states: list, method: str, **kwargs) -> dict:
    return merge_lora_state_dicts(states, RANKS, COUNTS, method=method, svd="exact", **kwargs)


def _rejects(states: list, method: str, *fragments: str, **kwargs) -> None:
    with pytest.raises(UpdateRejected) as info:
        _merge(states, method, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def _with(states: list, client: int, key: str, value: object) -> list:
    states = clone_states(states)
    states[client][key] = value
    return states


def _poisoned(tensor: torch.Tensor, bad: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = bad
    return tensor


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("bad", "count"), [("nan", "1 NaN"), ("inf", "1 Inf"), ("-inf", "1 Inf")])
def test_non_finite_client_value_is_rejected(method: str, bad: str, count: str) -> None:
    states = client_states(RANKS)
    states = _with(states, 1, KEY, _poisoned(states[1][KEY], float(bad)))
    _rejects(states, method, f"client 1: {KEY}: ", count)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_counts_name_both_kinds(method: str) -> None:
    states = client_states(RANKS)
    poisoned = states[0][HEAD_B].clone()
    poisoned[:] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    _rejects(_with(states, 0, HEAD_B, poisoned), method, f"client 0: {HEAD_B}: 1 NaN and 2 Inf")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_dtype_is_rejected(method: str, dtype: torch.dtype) -> None:
    states = client_states(RANKS)
    states = _with(states, 1, lora_b(CONV), states[1][lora_b(CONV)].to(dtype))
    _rejects(states, method, f"client 1: {lora_b(CONV)}: ", f"dtype {dtype}", "float32")


@pytest.mark.parametrize("method", METHODS)
def test_non_floating_dtype_in_every_client_is_rejected(method: str) -> None:
    # Before, an all-int64 merge returned int64 factors (truncated averages) without a word.
    states = [{key: tensor.to(torch.int64) for key, tensor in s.items()} for s in client_states()]
    with pytest.raises(UpdateRejected, match="client 0: .*dtype torch.int64"):
        merge_lora_state_dicts(states, [8, 8, 4, 2, 2], [1] * 5, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_dtypes_across_clients_are_rejected(method: str) -> None:
    states = [build_state(4, seed=0), build_state(2, seed=1, dtype=torch.float64)]
    _rejects(states, method, f"client 1: {KEY}: ", "torch.float64", "client 0's torch.float32")


@pytest.mark.parametrize("method", METHODS)
def test_one_key_in_another_dtype_is_rejected(method: str) -> None:
    states = client_states(RANKS, dtype=torch.bfloat16)
    states = _with(states, 1, HEAD_W, states[1][HEAD_W].to(torch.float16))
    _rejects(states, method, f"client 1: {HEAD_W}: ", "torch.float16", "torch.bfloat16")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [[[0.0] * 5] * 2, np.zeros((2, 5), dtype=np.float32), None])
def test_non_tensor_value_is_rejected(method: str, value: object) -> None:
    states = _with(client_states(RANKS), 1, KEY, value)
    _rejects(states, method, f"client 1: {KEY}: expected a tensor, got {type(value).__name__}")


def test_non_mapping_state_is_rejected() -> None:
    with pytest.raises(UpdateRejected, match="client 1: expected a mapping of tensors, got list"):
        _merge([build_state(4, seed=0), [torch.zeros(2)]], "fedilora")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_previous_is_rejected_by_every_method(method: str, bad: float) -> None:
    previous = build_state(8, seed=30)
    previous[lora_b(QUERY)] = _poisoned(previous[lora_b(QUERY)], bad)
    _rejects(client_states(RANKS), method, f"previous: {lora_b(QUERY)}: ", previous=previous)


@pytest.mark.parametrize("method", METHODS)
def test_non_floating_previous_is_rejected(method: str) -> None:
    previous = build_state(8, seed=30)
    previous[HEAD_W] = previous[HEAD_W].to(torch.int32)
    _rejects(
        client_states(RANKS), method, f"previous: {HEAD_W}: dtype torch.int32", previous=previous
    )


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_bad_scaling_names_the_client(bad: float) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(f"client 1: LoRA scaling must be finite and non-zero, got {bad}"),
    ):
        _merge(client_states(RANKS), "fedilora", scalings=[1.0, bad])


@pytest.mark.parametrize("bad", [0, float("nan"), -1])
def test_bad_sample_count_is_still_a_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match="client 1: num_samples must be positive"):
        merge_lora_state_dicts(client_states(RANKS), RANKS, [1, bad])


def test_update_rejected_keeps_caller_errors_value_errors() -> None:
    # Lengths and ranks stay plain ValueErrors (caller bugs), and UpdateRejected is one too.
    with pytest.raises(ValueError, match="2 states, 1 ranks") as info:
        merge_lora_state_dicts(client_states(RANKS), [4], [1, 1])
    assert not isinstance(info.value, UpdateRejected)
    assert issubclass(UpdateRejected, ValueError)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_has_the_clients_dtype_and_the_float64_values(
    method: str, dtype: torch.dtype
) -> None:
    states = client_states(RANKS, dtype=dtype)
    previous = build_state(8, seed=30, dtype=dtype)
    before = clone_states(states)
    kwargs = {"previous": previous, "global_rank": 8, "scalings": [4.0, 8.0]}
    merged = _merge(states, method, **kwargs)
    wide = [{key: tensor.double() for key, tensor in state.items()} for state in states]
    kwargs["previous"] = {key: tensor.double() for key, tensor in previous.items()}
    expected = _merge(wide, method, **kwargs)
    assert list(merged) == list(expected)
    tolerance = TOLERANCE[dtype]
    for key, tensor in merged.items():
        assert tensor.dtype == dtype, key
        assert expected[key].dtype == torch.float64, key
        torch.testing.assert_close(tensor.double(), expected[key], atol=tolerance, rtol=tolerance)
    for state, original in zip(states, before, strict=True):
        for key in original:
            assert torch.equal(state[key], original[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_keys_may_differ_in_dtype_within_a_state(method: str) -> None:
    states = client_states(RANKS)
    for state in states:
        state[HEAD_W] = state[HEAD_W].to(torch.bfloat16)
        state[lora_a(CONV)] = state[lora_a(CONV)].to(torch.float64)
    merged = _merge(states, method)
    dtypes = {key: tensor.dtype for key, tensor in states[0].items()}
    assert {key: tensor.dtype for key, tensor in merged.items()} == dtypes


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("previous_dtype", [torch.float64, torch.bfloat16])
def test_previous_of_another_dtype_is_cast_to_the_clients(
    method: str, previous_dtype: torch.dtype
) -> None:
    # float16 values upcast to float64 are exact, so casting them back loses nothing.
    previous = {
        key: tensor.to(previous_dtype)
        for key, tensor in build_state(8, seed=30, dtype=torch.float16).items()
    }
    merged = _merge(client_states(RANKS, dtype=torch.float16), method, previous=previous)
    assert {tensor.dtype for tensor in merged.values()} == {torch.float16}
    if method == "fedilora":  # dimensions 4..7 are uncovered and keep previous's values
        kept = previous[KEY][4:].to(torch.float16)
        assert torch.equal(merged[KEY][4:], kept)


def test_scalings_are_folded_in_float32_for_half_precision() -> None:
    # 40000 * 4 overflows float16 (max 65504) if folded in float16; diluted by zero-padding
    # (p_0 = 1/4) the merged B is 40000 again, which float16 holds exactly.
    states = client_states(RANKS, dtype=torch.float16)
    states[0][lora_b(QUERY)] = torch.full_like(states[0][lora_b(QUERY)], 40000.0)
    states[1][lora_b(QUERY)] = torch.zeros_like(states[1][lora_b(QUERY)])
    merged = _merge(states, "zeropad", scalings=[4.0, 1.0])
    expected = torch.full((6, 4), 40000.0, dtype=torch.float16)
    assert torch.equal(merged[lora_b(QUERY)], expected)


def test_result_that_overflows_its_dtype_is_a_value_error() -> None:
    states = client_states(RANKS, dtype=torch.float16)
    with pytest.raises(
        ValueError,
        match=re.escape(f"{lora_b(QUERY)}: the merged tensor does not fit in torch.float16"),
    ):
        _merge(states, "zeropad", scalings=[1e6, 1e6])


@pytest.mark.parametrize("dtype", MERGE_DTYPES)
def test_check_state_tensors_accepts_every_merge_dtype(dtype: torch.dtype) -> None:
    check_state_tensors(build_state(2, seed=0, dtype=dtype), "client 0")


def test_check_state_tensors_rejects_float8() -> None:
    state = build_state(2, seed=0)
    state[KEY] = state[KEY].to(torch.float8_e4m3fn)
    with pytest.raises(
        UpdateRejected, match=f"server: {re.escape(KEY)}: dtype torch.float8_e4m3fn"
    ):
        check_state_tensors(state, "server")
