"""FLoRA stacking (docs/algorithms.md §1.6): the stacked product is exactly sum_i p_i B_i A_i."""

import pytest
import torch
from lora_builders import (
    CONV,
    DENSE,
    HEAD_B,
    HEAD_W,
    MODULES,
    NUM_SAMPLES,
    QUERY,
    RANKS,
    assert_states_equal,
    build_state,
    client_states,
    clone_states,
    dense_average,
    lora_a,
    lora_b,
    product,
    weighted_product_sum,
)

from aggregation import FLoRAMerger, flora_delta, flora_stack, get_merger, lora_rank


def test_stacked_product_is_weighted_sum_of_products() -> None:
    states = client_states(dtype=torch.float64)
    before = clone_states(states)
    stacked = flora_stack(states, RANKS, NUM_SAMPLES)
    assert lora_rank(stacked) == sum(RANKS)
    for module in MODULES:
        torch.testing.assert_close(
            product(stacked, module),
            weighted_product_sum(states, NUM_SAMPLES, module),
            atol=1e-12,
            rtol=1e-12,
        )
    for key in DENSE:
        torch.testing.assert_close(stacked[key], dense_average(states, NUM_SAMPLES, key))
    for state, original in zip(states, before, strict=True):
        assert_states_equal(state, original)


def test_stack_layout_is_client_blocks_in_order() -> None:
    states = client_states(dtype=torch.float64)
    stacked = flora_stack(states, RANKS, NUM_SAMPLES)
    total = float(sum(NUM_SAMPLES))
    start = 0
    for state, rank, n in zip(states, RANKS, NUM_SAMPLES, strict=True):
        for module in MODULES:
            block_a = stacked[lora_a(module)][start : start + rank]
            block_b = stacked[lora_b(module)][:, start : start + rank]
            torch.testing.assert_close(block_a, (n / total) * state[lora_a(module)])
            assert torch.equal(block_b, state[lora_b(module)])
        start += rank
    assert stacked[lora_a(CONV)].shape == (sum(RANKS), 3, 1, 1)
    assert stacked[lora_b(CONV)].shape == (4, sum(RANKS), 1, 1)


def test_flora_delta_is_the_product_shaped_like_the_base_weight() -> None:
    states = client_states(dtype=torch.float64)
    deltas = flora_delta(flora_stack(states, RANKS, NUM_SAMPLES))
    assert list(deltas) == [f"{module}." for module in MODULES]
    for module, (d, k, is_conv) in MODULES.items():
        delta = deltas[f"{module}."]
        assert delta.shape == ((d, k, 1, 1) if is_conv else (d, k))
        torch.testing.assert_close(
            delta.reshape(d, k), weighted_product_sum(states, NUM_SAMPLES, module)
        )


def test_flora_delta_keeps_dtype() -> None:
    stacked = flora_stack(client_states(dtype=torch.bfloat16), RANKS, NUM_SAMPLES)
    assert {tensor.dtype for tensor in stacked.values()} == {torch.bfloat16}
    assert {tensor.dtype for tensor in flora_delta(stacked).values()} == {torch.bfloat16}


def test_merger_ignores_global_rank_and_previous() -> None:
    states = client_states()
    merger = get_merger("flora")
    assert isinstance(merger, FLoRAMerger)
    # What the server passes every round: the last global state and its rank.
    merged = merger.merge(
        states, RANKS, NUM_SAMPLES, previous=build_state(8, seed=40), global_rank=8
    )
    assert lora_rank(merged) == sum(RANKS)
    assert_states_equal(merged, flora_stack(states, RANKS, NUM_SAMPLES))


def test_merger_still_validates_inputs() -> None:
    with pytest.raises(ValueError, match="declared rank 4 but its tensors have 2"):
        get_merger("flora").merge(client_states([2, 2]), [4, 2], [1, 1])
    with pytest.raises(ValueError, match="2 states, 1 ranks"):
        get_merger("flora").merge(client_states([2, 2]), [2], [1, 1])


def test_redistribute_hands_back_only_dense_keys() -> None:
    merger = FLoRAMerger()
    stacked = merger.merge(client_states(), RANKS, NUM_SAMPLES)
    local = merger.redistribute(stacked, 2)
    assert list(local) == [HEAD_W, HEAD_B]
    assert torch.equal(local[HEAD_W], stacked[HEAD_W])
    local[HEAD_W].zero_()
    assert not torch.equal(local[HEAD_W], stacked[HEAD_W])  # a copy, not a view
    with pytest.raises(ValueError, match="rank must be at least 1"):
        merger.redistribute(stacked, 0)


def test_single_client_stack_is_that_client() -> None:
    state = build_state(4, seed=2)
    stacked = flora_stack([state], [4], [7])
    assert_states_equal(stacked, state)
    torch.testing.assert_close(flora_delta(stacked)[f"{QUERY}."], product(state, QUERY).float())
