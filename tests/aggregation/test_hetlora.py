"""HetLoRA (docs/algorithms.md §1.4): norm weights, the merge, and the self-pruning term vs
loops."""

import pytest
import torch
from lora_builders import (
    CONV,
    HEAD_W,
    MODULES,
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
    product,
)

from aggregation import (
    HetLoRAMerger,
    get_merger,
    hetlora_merge,
    hetlora_tail_norm,
    hetlora_weights,
    lora_rank,
    product_norm,
)


def reference_weights(states: list[dict], num_samples: list[float]) -> torch.Tensor:
    """``w_i ∝ n_i * sum_modules ||B_i A_i||_F`` with the products formed explicitly."""
    masses = []
    for state, n in zip(states, num_samples, strict=True):
        norm = sum(float(torch.linalg.norm(product(state, module))) for module in MODULES)
        masses.append(n * norm)
    total = sum(masses)
    return torch.tensor([mass / total for mass in masses], dtype=torch.float64)


def reference_hetlora(
    states: list[dict], ranks: list[int], num_samples: list[float], global_rank: int
) -> dict:
    """Per-dimension loop: dimension j sums w_i * factor_i[j] over clients with r_i > j."""
    weights = reference_weights(states, num_samples).tolist()
    total = float(sum(num_samples))
    merged = {}
    for key in states[0]:
        if ".lora_A." in key or ".lora_B." in key:
            axis = 0 if ".lora_A." in key else 1
            shape = list(states[0][key].shape)
            shape[axis] = global_rank
            out = torch.zeros(shape, dtype=torch.float64)
            for j in range(global_rank):
                for i, state in enumerate(states):
                    if ranks[i] > j:
                        out.select(axis, j).add_(
                            weights[i] * state[key].select(axis, j).to(torch.float64)
                        )
        else:
            out = sum(
                (n / total) * state[key].to(torch.float64)
                for n, state in zip(num_samples, states, strict=True)
            )
        merged[key] = out
    return merged


def test_product_norm_matches_explicit_products() -> None:
    state = build_state(4, seed=7, dtype=torch.float64)
    expected = sum(float(torch.linalg.norm(product(state, module))) for module in MODULES)
    assert product_norm(state) == pytest.approx(expected, rel=1e-12)


def test_weights_match_reference_and_sum_to_one() -> None:
    states = client_states()
    weights = hetlora_weights(states, NUM_SAMPLES)
    torch.testing.assert_close(weights, reference_weights(states, NUM_SAMPLES), rtol=1e-5, atol=0)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert weights.dtype == torch.float64


def test_weights_fall_back_to_sample_shares_when_all_updates_are_zero() -> None:
    states = client_states([4, 2])
    for state in states:
        for module in MODULES:
            state[lora_b(module)] = torch.zeros_like(state[lora_b(module)])
    weights = hetlora_weights(states, [1, 3])
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_zero_update_client_gets_zero_weight() -> None:
    states = client_states([4, 2])
    for module in MODULES:
        states[1][lora_a(module)] = torch.zeros_like(states[1][lora_a(module)])
    assert hetlora_weights(states, [1, 3]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("global_rank", [8, 10])
def test_merge_matches_reference_loop(global_rank: int) -> None:
    states = client_states()
    before = clone_states(states)
    merged = hetlora_merge(states, RANKS, NUM_SAMPLES, global_rank=global_rank)
    assert_states_close(merged, reference_hetlora(states, RANKS, NUM_SAMPLES, global_rank))
    assert lora_rank(merged) == global_rank
    assert merged[lora_a(CONV)].shape == (global_rank, 3, 1, 1)
    for state, original in zip(states, before, strict=True):
        assert_states_equal(state, original)


def test_dense_keys_use_sample_shares_not_norm_weights() -> None:
    states = client_states()
    merged = hetlora_merge(states, RANKS, NUM_SAMPLES)
    expected = sum(n / 100 * state[HEAD_W].double() for n, state in zip(NUM_SAMPLES, states))
    torch.testing.assert_close(merged[HEAD_W].double(), expected, atol=1e-6, rtol=1e-6)


def test_merger_uses_previous_rank_and_truncates_on_redistribute() -> None:
    states = client_states([4, 2])
    merger = get_merger("hetlora")
    assert isinstance(merger, HetLoRAMerger)
    merged = merger.merge(states, [4, 2], [1, 1], previous=build_state(8, seed=9))
    assert lora_rank(merged) == 8
    assert torch.equal(merged[lora_a(QUERY)][4:], torch.zeros(4, 5))
    local = merger.redistribute(merged, 2)
    assert torch.equal(local[lora_b(QUERY)], merged[lora_b(QUERY)][:, :2])


def test_keeps_bfloat16() -> None:
    merged = hetlora_merge(client_states(dtype=torch.bfloat16), RANKS, NUM_SAMPLES)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}


def test_rejects_unpaired_factor() -> None:
    states = client_states([2, 2])
    for state in states:
        del state[lora_b(QUERY)]
    with pytest.raises(ValueError, match="no matching"):
        hetlora_merge(states, [2, 2], [1, 1])


@pytest.mark.parametrize("delta", [1, 2, 4])
def test_tail_norm_matches_loop_over_tail_dimensions(delta: int) -> None:
    state = build_state(4, seed=5, dtype=torch.float64)
    expected = 0.0
    for module, (d, k, _) in MODULES.items():
        a = state[lora_a(module)].reshape(4, k)
        b = state[lora_b(module)].reshape(d, 4)
        tail = torch.zeros(d, k, dtype=torch.float64)
        for j in range(4 - delta, 4):
            tail += torch.outer(b[:, j], a[j])
        expected += float(torch.linalg.norm(tail))
    assert float(hetlora_tail_norm(state, delta)) == pytest.approx(expected, rel=1e-12)


def test_tail_norm_is_differentiable_even_at_zero() -> None:
    state = {key: tensor.clone().requires_grad_(True) for key, tensor in build_state(4, 1).items()}
    hetlora_tail_norm(state, 2).backward()
    grad = state[lora_a(QUERY)].grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    assert torch.equal(grad[:2], torch.zeros(2, 5))  # only the tail dimensions are penalised
    assert bool(grad[2:].abs().sum() > 0)
    zero = build_state(4, 1)
    for module in MODULES:
        zero[lora_b(module)] = torch.zeros_like(zero[lora_b(module)])
    zero = {key: tensor.requires_grad_(True) for key, tensor in zero.items()}
    loss = hetlora_tail_norm(zero, 2)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(
        bool(torch.isfinite(tensor.grad).all())
        for tensor in zero.values()
        if tensor.grad is not None
    )


@pytest.mark.parametrize("delta", [0, 5])
def test_tail_norm_rejects_bad_delta(delta: int) -> None:
    with pytest.raises(ValueError, match=r"delta must be in \[1, 4\]"):
        hetlora_tail_norm(build_state(4, 0), delta)
