"""FediLoRA dimension-wise reweighting (docs/algorithms.md §1.2) against the per-dimension loop."""

import pytest
import torch
from lora_builders import (
    CONV,
    HEAD_B,
    MODULES,
    NUM_SAMPLES,
    QUERY,
    RANKS,
    VALUE,
    assert_states_close,
    assert_states_equal,
    build_state,
    client_states,
    clone_states,
    lora_a,
    lora_b,
    reference_merge,
)

from aggregation import dimension_weights, fedilora_merge, lora_rank, zeropad_merge


def test_dimension_weights_by_hand() -> None:
    weights, covered = dimension_weights([3, 1], [1, 3], 4)
    expected = torch.tensor(
        [
            [0.25, 1.0, 1.0, 0.0],
            [0.75, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(weights, expected)
    assert covered.tolist() == [True, True, True, False]


def test_dimension_weights_columns_sum_to_one_where_covered() -> None:
    weights, covered = dimension_weights(RANKS, NUM_SAMPLES, 10)
    sums = weights.sum(dim=0)
    torch.testing.assert_close(sums[covered], torch.ones(8, dtype=torch.float64))
    assert torch.equal(sums[~covered], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(weights[:, 0], torch.tensor(NUM_SAMPLES, dtype=torch.float64) / 100)


def test_fedilora_matches_reference_loop() -> None:
    states = client_states()
    merged = fedilora_merge(states, RANKS, NUM_SAMPLES)
    expected = reference_merge(states, RANKS, NUM_SAMPLES, 8, reweight=True)
    assert_states_close(merged, expected)
    assert {tensor.dtype for tensor in merged.values()} == {torch.float32}


def test_fedilora_with_previous_matches_reference_loop() -> None:
    states = client_states([4, 2, 2])
    previous = build_state(8, seed=50)
    merged = fedilora_merge(states, [4, 2, 2], [3, 1, 2], previous=previous)
    expected = reference_merge(states, [4, 2, 2], [3, 1, 2], 8, reweight=True, previous=previous)
    assert_states_close(merged, expected)


def test_equal_ranks_is_fedavg() -> None:
    ranks = [4, 4, 4]
    states = client_states(ranks)
    counts = [5, 20, 75]
    fedavg = {
        key: sum(n / 100 * state[key] for n, state in zip(counts, states, strict=True))
        for key in states[0]
    }
    reweighted = fedilora_merge(states, ranks, counts)
    padded = zeropad_merge(states, ranks, counts)
    assert_states_close(reweighted, fedavg)
    assert_states_close(padded, fedavg)
    assert_states_close(reweighted, padded, atol=0.0)


def test_uncovered_dimension_keeps_previous_value() -> None:
    states = client_states([4, 2])
    previous = build_state(8, seed=99)
    merged = fedilora_merge(states, [4, 2], [1, 1], previous=previous, empty_dim="keep")
    assert lora_rank(merged) == 8
    for module in MODULES:
        assert torch.equal(merged[lora_a(module)][4:], previous[lora_a(module)][4:])
        assert torch.equal(merged[lora_b(module)][:, 4:], previous[lora_b(module)][:, 4:])
        assert not torch.equal(merged[lora_a(module)][:4], previous[lora_a(module)][:4])
    # Dense tensors are always the plain average, never the previous value.
    torch.testing.assert_close(merged[HEAD_B], (states[0][HEAD_B] + states[1][HEAD_B]) / 2)


def test_uncovered_dimension_is_zero_with_empty_dim_zero() -> None:
    states = client_states([4, 2])
    previous = build_state(8, seed=99)
    merged = fedilora_merge(states, [4, 2], [1, 1], previous=previous, empty_dim="zero")
    assert torch.equal(merged[lora_a(QUERY)][4:], torch.zeros(4, 5))
    assert torch.equal(merged[lora_b(CONV)][:, 4:], torch.zeros(4, 4, 1, 1))


def test_uncovered_dimension_without_previous_is_zero() -> None:
    merged = fedilora_merge(client_states([4, 2]), [4, 2], [1, 1], global_rank=6)
    assert torch.equal(merged[lora_b(VALUE)][:, 4:], torch.zeros(7, 2))


def test_previous_of_lower_rank_fills_what_it_has() -> None:
    previous = build_state(6, seed=7)
    merged = fedilora_merge(client_states([4, 2]), [4, 2], [1, 1], previous=previous, global_rank=8)
    assert torch.equal(merged[lora_a(QUERY)][4:6], previous[lora_a(QUERY)][4:6])
    assert torch.equal(merged[lora_a(QUERY)][6:], torch.zeros(2, 5))


def test_global_rank_defaults_to_previous_rank() -> None:
    merged = fedilora_merge(client_states([4]), [4], [1], previous=build_state(8, seed=7))
    assert lora_rank(merged) == 8


def test_fedilora_leaves_inputs_alone() -> None:
    states = client_states([4, 2])
    previous = build_state(8, seed=99)
    before, previous_before = clone_states(states), clone_states([previous])[0]
    merged = fedilora_merge(states, [4, 2], [1, 1], previous=previous)
    for tensor in merged.values():
        tensor.add_(1.0)
    for state, original in zip(states, before, strict=True):
        assert_states_equal(state, original)
    assert_states_equal(previous, previous_before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fedilora_keeps_dtype(dtype: torch.dtype) -> None:
    merged = fedilora_merge(client_states(dtype=dtype), RANKS, NUM_SAMPLES)
    assert {tensor.dtype for tensor in merged.values()} == {dtype}


def test_fedilora_rejects_unknown_empty_dim() -> None:
    with pytest.raises(ValueError, match="empty_dim must be one of"):
        fedilora_merge(client_states([2]), [2], [1], empty_dim="drop")  # type: ignore[arg-type]


def test_fedilora_rejects_previous_above_global_rank() -> None:
    with pytest.raises(ValueError, match="previous global state has rank 8"):
        fedilora_merge(client_states([2]), [2], [1], previous=build_state(8, seed=0), global_rank=4)
