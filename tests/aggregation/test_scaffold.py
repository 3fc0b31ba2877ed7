"""SCAFFOLD control variates (docs/algorithms.md §3.3) against per-entry and per-client loops."""

import re

import pytest
import torch
from lora_builders import CONV, HEAD_B, QUERY, build_state, lora_a, lora_b

from aggregation import scaffold_client_variate, scaffold_server_variate


def zeros_like(state: dict) -> dict:
    return {key: torch.zeros_like(tensor) for key, tensor in state.items()}


def test_zero_variates_give_the_scaled_model_change() -> None:
    theta_g, theta_i = build_state(4, seed=0), build_state(4, seed=1)
    out = scaffold_client_variate(
        zeros_like(theta_i), zeros_like(theta_i), theta_g, theta_i, 5, 0.1
    )
    implicit = scaffold_client_variate(None, None, theta_g, theta_i, 5, 0.1)
    for key in theta_i:
        expected = (theta_g[key] - theta_i[key]) / (5 * 0.1)
        torch.testing.assert_close(out[key], expected)
        assert torch.equal(implicit[key], out[key])


def test_client_variate_matches_per_entry_formula() -> None:
    c_i, c = (
        build_state(4, seed=2, dtype=torch.float64),
        build_state(4, seed=3, dtype=torch.float64),
    )
    theta_g = build_state(4, seed=4, dtype=torch.float64)
    theta_i = build_state(4, seed=5, dtype=torch.float64)
    steps, lr = 7, 0.03
    out = scaffold_client_variate(c_i, c, theta_g, theta_i, steps, lr)
    for key in theta_i:
        flat = [
            float(c_i[key].flatten()[n])
            - float(c[key].flatten()[n])
            + (float(theta_g[key].flatten()[n]) - float(theta_i[key].flatten()[n])) / (steps * lr)
            for n in range(theta_i[key].numel())
        ]
        assert out[key].flatten().tolist() == pytest.approx(flat, rel=1e-12, abs=1e-12)


def test_client_variate_is_float32_for_half_inputs() -> None:
    theta_g = build_state(2, seed=0, dtype=torch.bfloat16)
    theta_i = build_state(2, seed=1, dtype=torch.bfloat16)
    out = scaffold_client_variate(None, None, theta_g, theta_i, 1, 1.0)
    assert {tensor.dtype for tensor in out.values()} == {torch.float32}


@pytest.mark.parametrize(
    ("steps", "lr", "message"), [(0, 0.1, "steps must be at least 1"), (1, 0.0, "lr must be")]
)
def test_client_variate_rejects_bad_schedule(steps: int, lr: float, message: str) -> None:
    state = build_state(2, seed=0)
    with pytest.raises(ValueError, match=message):
        scaffold_client_variate(None, None, state, state, steps, lr)


def test_client_variate_rejects_other_rank() -> None:
    with pytest.raises(ValueError, match=re.escape("c: ") + ".*has shape"):
        scaffold_client_variate(None, build_state(4, 0), build_state(2, 1), build_state(2, 2), 1, 1)


def test_server_variate_matches_per_client_loop() -> None:
    global_rank, total_clients = 8, 10
    ranks = [8, 4, 2]
    c = build_state(global_rank, seed=10, dtype=torch.float64)
    deltas = [build_state(rank, seed=20 + i, dtype=torch.float64) for i, rank in enumerate(ranks)]
    out = scaffold_server_variate(c, deltas, ranks, total_clients, global_rank)
    for key in c:
        total = torch.zeros_like(c[key])
        for delta, rank in zip(deltas, ranks, strict=True):
            if ".lora_A." in key:
                total[:rank] += delta[key]
            elif ".lora_B." in key:
                total[:, :rank] += delta[key]
            else:
                total += delta[key]
        expected = c[key] + (len(ranks) / total_clients) * total / len(ranks)
        torch.testing.assert_close(out[key], expected, atol=1e-12, rtol=1e-12)
    # Dimensions 4..7 are trained only by client 0: the others contribute zero there.
    torch.testing.assert_close(
        out[lora_a(QUERY)][4:], c[lora_a(QUERY)][4:] + deltas[0][lora_a(QUERY)][4:] / total_clients
    )
    assert out[lora_b(CONV)].shape == (4, 8, 1, 1)
    assert out[HEAD_B].shape == (3,)


def test_server_variate_validates_inputs() -> None:
    c = build_state(4, seed=0)
    with pytest.raises(ValueError, match="below the 2 sampled clients"):
        scaffold_server_variate(c, [build_state(2, 1)] * 2, [2, 2], 1, 4)
    with pytest.raises(ValueError, match="declared rank 4"):
        scaffold_server_variate(c, [build_state(2, 1)], [4], 5, 4)
    with pytest.raises(ValueError, match=re.escape("rank 8 is outside [1, 4]")):
        scaffold_server_variate(c, [build_state(8, 1)], [8], 5, 4)
    with pytest.raises(ValueError, match="at least one client delta"):
        scaffold_server_variate(c, [], [], 5, 4)
