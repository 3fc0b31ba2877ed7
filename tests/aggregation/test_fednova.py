"""FedNova (docs/algorithms.md §3.4): rescaled updates merged with zero-padding give the FedNova
step."""

import pytest
import torch
from lora_builders import (
    NUM_SAMPLES,
    RANKS,
    assert_states_close,
    assert_states_equal,
    build_state,
    clone_states,
)

from aggregation import fednova_rescale, truncate, zeropad_merge

STEPS = [10, 3, 7, 1, 5]


def pad_by_hand(key: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    if ".lora_A." in key:
        out = torch.zeros(rank, *tensor.shape[1:], dtype=torch.float64)
        out[: tensor.shape[0]] = tensor
    elif ".lora_B." in key:
        out = torch.zeros(tensor.shape[0], rank, *tensor.shape[2:], dtype=torch.float64)
        out[:, : tensor.shape[1]] = tensor
    else:
        out = tensor.to(torch.float64).clone()
    return out


def fednova_direct(
    references: list[dict], updates: list[dict], steps: list[int], num_samples: list[int], rank: int
) -> dict:
    """``sum_i p_i pad(ref_i) - τ_eff sum_i p_i pad(ref_i - θ_i) / τ_i`` by a loop over clients.

    With equal ranks every ``ref_i`` is ``θ_g`` and this is FedNova's ``θ_g - τ_eff sum ...``.
    """
    total = sum(num_samples)
    weights = [n / total for n in num_samples]
    tau_eff = sum(p * tau for p, tau in zip(weights, steps, strict=True))
    out = {}
    for key in updates[0]:
        start = sum(
            p * pad_by_hand(key, ref[key], rank) for p, ref in zip(weights, references, strict=True)
        )
        normalised = sum(
            p * pad_by_hand(key, ref[key] - theta[key], rank) / tau
            for p, ref, theta, tau in zip(weights, references, updates, steps, strict=True)
        )
        out[key] = start - tau_eff * normalised
    return out


def test_equal_steps_is_the_identity_so_merging_gives_fedavg() -> None:
    theta_g = build_state(8, seed=0)
    references = [truncate(theta_g, rank) for rank in RANKS]
    updates = [build_state(rank, seed=i + 1) for i, rank in enumerate(RANKS)]
    before = clone_states(updates)
    rescaled = fednova_rescale(updates, references, [4] * 5, NUM_SAMPLES)
    for got, want in zip(rescaled, updates, strict=True):
        assert_states_equal(got, want)
    assert_states_equal(
        zeropad_merge(rescaled, RANKS, NUM_SAMPLES), zeropad_merge(updates, RANKS, NUM_SAMPLES)
    )
    for state, original in zip(updates, before, strict=True):
        assert_states_equal(state, original)


def test_rescaling_matches_per_client_formula() -> None:
    theta_g = build_state(8, seed=0, dtype=torch.float64)
    references = [truncate(theta_g, rank) for rank in RANKS]
    updates = [build_state(rank, seed=i + 1, dtype=torch.float64) for i, rank in enumerate(RANKS)]
    rescaled = fednova_rescale(updates, references, STEPS, NUM_SAMPLES)
    tau_eff = sum(n * tau for n, tau in zip(NUM_SAMPLES, STEPS, strict=True)) / sum(NUM_SAMPLES)
    for got, ref, theta, tau in zip(rescaled, references, updates, STEPS, strict=True):
        for key in theta:
            expected = ref[key] + (tau_eff / tau) * (theta[key] - ref[key])
            torch.testing.assert_close(got[key], expected)


def test_unequal_steps_equal_ranks_merge_to_the_fednova_step() -> None:
    ranks = [8] * 5
    theta_g = build_state(8, seed=0, dtype=torch.float64)
    updates = [build_state(8, seed=i + 1, dtype=torch.float64) for i in range(5)]
    references = [theta_g] * 5
    merged = zeropad_merge(
        fednova_rescale(updates, references, STEPS, NUM_SAMPLES), ranks, NUM_SAMPLES
    )
    total = sum(NUM_SAMPLES)
    tau_eff = sum(n / total * tau for n, tau in zip(NUM_SAMPLES, STEPS, strict=True))
    expected = {
        key: theta_g[key]
        - tau_eff
        * sum(
            n / total * (theta_g[key] - theta[key]) / tau
            for n, theta, tau in zip(NUM_SAMPLES, updates, STEPS, strict=True)
        )
        for key in theta_g
    }
    assert_states_close(merged, expected, atol=1e-12)


def test_unequal_steps_heterogeneous_ranks_merge_to_the_fednova_step() -> None:
    theta_g = build_state(8, seed=0, dtype=torch.float64)
    references = [truncate(theta_g, rank) for rank in RANKS]
    updates = [build_state(rank, seed=i + 1, dtype=torch.float64) for i, rank in enumerate(RANKS)]
    merged = zeropad_merge(
        fednova_rescale(updates, references, STEPS, NUM_SAMPLES), RANKS, NUM_SAMPLES
    )
    expected = fednova_direct(references, updates, STEPS, NUM_SAMPLES, 8)
    assert_states_close(merged, expected, atol=1e-12)


def test_keeps_dtype() -> None:
    update = build_state(2, seed=1, dtype=torch.bfloat16)
    reference = build_state(2, seed=2, dtype=torch.bfloat16)
    (out, _) = fednova_rescale([update, update], [reference, reference], [1, 3], [1, 1])
    assert {tensor.dtype for tensor in out.values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("steps", "num_samples", "message"),
    [
        ([1], [1, 1], "2 updates, 2 references, 1 step counts"),
        ([0, 1], [1, 1], "client 0: steps must be at least 1"),
        ([1, 1], [1, -1], "client 1: num_samples must be positive"),
    ],
)
def test_rejects_bad_counts(steps: list, num_samples: list, message: str) -> None:
    states = [build_state(2, seed=0), build_state(2, seed=1)]
    with pytest.raises(ValueError, match=message):
        fednova_rescale(states, states, steps, num_samples)


def test_rejects_reference_of_other_rank() -> None:
    with pytest.raises(ValueError, match="its reference has"):
        fednova_rescale([build_state(2, 0)], [build_state(4, 0)], [1], [1])
