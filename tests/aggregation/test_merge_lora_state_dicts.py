"""End to end through ``merge_lora_state_dicts``: method choice, previous, scalings, dtype."""

import re

import pytest
import torch
from lora_builders import (
    NUM_SAMPLES,
    QUERY,
    RANKS,
    assert_states_close,
    assert_states_equal,
    build_state,
    client_states,
    clone_states,
    lora_a,
    reference_merge,
)

from aggregation import fold_scaling, lora_rank, merge_lora_state_dicts


@pytest.mark.parametrize(("method", "reweight"), [("fedilora", True), ("zeropad", False)])
def test_end_to_end_matches_reference(method: str, reweight: bool) -> None:
    states = client_states()
    before = clone_states(states)
    merged = merge_lora_state_dicts(states, RANKS, NUM_SAMPLES, method=method)
    assert_states_close(merged, reference_merge(states, RANKS, NUM_SAMPLES, 8, reweight=reweight))
    assert list(merged) == list(states[0])
    assert {tensor.dtype for tensor in merged.values()} == {torch.float32}
    for state, original in zip(states, before, strict=True):
        assert_states_equal(state, original)


def test_default_method_is_fedilora_with_previous_rank() -> None:
    states = client_states([4, 2, 2])
    previous = build_state(8, seed=30)
    merged = merge_lora_state_dicts(states, [4, 2, 2], [1, 2, 3], previous=previous)
    assert lora_rank(merged) == 8
    assert torch.equal(merged[lora_a(QUERY)][4:], previous[lora_a(QUERY)][4:])
    expected = reference_merge(states, [4, 2, 2], [1, 2, 3], 8, reweight=True, previous=previous)
    assert_states_close(merged, expected)


def test_empty_dim_zero_is_passed_to_fedilora() -> None:
    merged = merge_lora_state_dicts(
        client_states([4, 2]), [4, 2], [1, 1], previous=build_state(8, seed=30), empty_dim="zero"
    )
    assert torch.equal(merged[lora_a(QUERY)][4:], torch.zeros(4, 5))


def test_scalings_fold_each_client_before_merging() -> None:
    states = client_states()
    scalings = [16 / rank for rank in RANKS]
    merged = merge_lora_state_dicts(states, RANKS, NUM_SAMPLES, scalings=scalings)
    folded = [fold_scaling(state, s) for state, s in zip(states, scalings, strict=True)]
    assert_states_close(merged, reference_merge(folded, RANKS, NUM_SAMPLES, 8, reweight=True))


def test_dtype_of_inputs_is_kept() -> None:
    states = client_states(dtype=torch.bfloat16)
    merged = merge_lora_state_dicts(states, RANKS, NUM_SAMPLES, scalings=[0.5] * 5)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}


def test_unknown_method_lists_valid_names() -> None:
    valid = "valid methods: fedilora, fedilora_damped, flexlora, flora, hetlora, raflora, zeropad"
    with pytest.raises(ValueError, match=re.escape(valid)):
        merge_lora_state_dicts(client_states(), RANKS, NUM_SAMPLES, method="hetlora2")


def test_scalings_length_must_match() -> None:
    with pytest.raises(ValueError, match="got 2 scalings for 5 states"):
        merge_lora_state_dicts(client_states(), RANKS, NUM_SAMPLES, scalings=[1.0, 1.0])
