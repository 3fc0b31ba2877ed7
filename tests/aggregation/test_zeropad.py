"""Zero-padding FedAvg (docs/algorithms.md §1.1) against the per-dimension loop, and its
dilution."""

import pytest
import torch
from lora_builders import (
    CONV,
    HEAD_W,
    NUM_SAMPLES,
    QUERY,
    RANKS,
    assert_states_close,
    assert_states_equal,
    build_state,
    client_states,
    clone_states,
    lora_a,
    lora_b,
    reference_merge,
    truncate_all,
)

from aggregation import fedilora_merge, lora_rank, zeropad_merge


@pytest.mark.parametrize("global_rank", [8, 10])
def test_zeropad_matches_reference_loop(global_rank: int) -> None:
    states = client_states()
    merged = zeropad_merge(states, RANKS, NUM_SAMPLES, global_rank=global_rank)
    expected = reference_merge(states, RANKS, NUM_SAMPLES, global_rank, reweight=False)
    assert_states_close(merged, expected)
    assert lora_rank(merged) == global_rank
    assert torch.equal(merged[lora_a(QUERY)][8:], torch.zeros(global_rank - 8, 5))


def test_zeropad_dilutes_high_dimensions_by_covered_share() -> None:
    # Every client holds a truncation of one shared adapter, so any average of them should
    # give the shared values back; zero-padding instead shrinks dimension j by the sample
    # share of the clients that cover it.
    shared = build_state(8, seed=11)
    states = truncate_all(shared, RANKS)
    merged = zeropad_merge(states, RANKS, NUM_SAMPLES)
    total = sum(NUM_SAMPLES)
    share = torch.tensor(
        [sum(n for n, r in zip(NUM_SAMPLES, RANKS, strict=True) if r > j) / total for j in range(8)]
    )
    assert share[0] == 1.0 and share[-1] == 40 / 100
    torch.testing.assert_close(merged[lora_a(QUERY)], share[:, None] * shared[lora_a(QUERY)])
    torch.testing.assert_close(
        merged[lora_b(CONV)], share[None, :, None, None] * shared[lora_b(CONV)]
    )
    torch.testing.assert_close(merged[HEAD_W], shared[HEAD_W])
    # FediLoRA's reweighting removes the dilution.
    reweighted = fedilora_merge(states, RANKS, NUM_SAMPLES)
    assert_states_close(reweighted, shared)


def test_zeropad_keeps_dtype_and_leaves_inputs_alone() -> None:
    states = client_states(dtype=torch.bfloat16)
    before = clone_states(states)
    merged = zeropad_merge(states, RANKS, NUM_SAMPLES)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}
    for state, original in zip(states, before, strict=True):
        assert_states_equal(state, original)
    expected = reference_merge(states, RANKS, NUM_SAMPLES, 8, reweight=False)
    assert_states_close(merged, expected, atol=2e-2)


def test_zeropad_rejects_rank_mismatch() -> None:
    with pytest.raises(ValueError, match="declared rank 4"):
        zeropad_merge(client_states([2, 2]), [4, 2], [1, 1])
