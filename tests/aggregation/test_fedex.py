"""FedEx-LoRA's residual (docs/algorithms.md §1.7): base + global adapter is the exact client
average."""

from collections.abc import Callable

import pytest
import torch
from lora_builders import (
    CONV,
    MODULES,
    QUERY,
    build_state,
    client_states,
    clone_states,
    lora_a,
    lora_b,
    product,
    weighted_product_sum,
)
from torch import Tensor

from aggregation import (
    fedex_residual,
    fedilora_merge,
    flexlora_merge,
    flora_delta,
    hetlora_merge,
    zeropad_merge,
)

RANKS = [4, 2, 1, 2]
NUM_SAMPLES = [10, 30, 5, 15]

Merge = Callable[[list[dict[str, Tensor]], list[int], list[float]], dict[str, Tensor]]

MERGES: dict[str, Merge] = {
    "zeropad": zeropad_merge,
    "zeropad-R6": lambda s, r, n: zeropad_merge(s, r, n, global_rank=6),
    "fedilora": fedilora_merge,
    "fedilora-R6": lambda s, r, n: fedilora_merge(s, r, n, global_rank=6),
    "hetlora": hetlora_merge,
    "flexlora": lambda s, r, n: flexlora_merge(s, r, n, svd="exact"),
}


def reference_residual(
    states: list[dict[str, Tensor]],
    num_samples: list[float],
    merged: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Straight from the formula: loops over modules and clients, full products, float64."""
    total = float(sum(num_samples))
    residuals = {}
    for module, (d, k, is_conv) in MODULES.items():
        exact = torch.zeros(d, k, dtype=torch.float64)
        for state, n in zip(states, num_samples, strict=True):
            a = state[lora_a(module)].to(torch.float64).reshape(-1, k)  # (r_i, k)
            b = state[lora_b(module)].to(torch.float64).reshape(d, -1)  # (d, r_i)
            exact += (n / total) * (b @ a)
        a_g = merged[lora_a(module)].to(torch.float64).reshape(-1, k)  # (R, k)
        b_g = merged[lora_b(module)].to(torch.float64).reshape(d, -1)  # (d, R)
        residual = exact - b_g @ a_g
        residuals[f"{module}."] = residual.reshape(d, k, 1, 1) if is_conv else residual
    return residuals


@pytest.mark.parametrize("merge", MERGES.values(), ids=MERGES.keys())
def test_matches_reference_on_heterogeneous_ranks(merge: Merge) -> None:
    states = client_states(RANKS, dtype=torch.float64)
    merged = merge(states, RANKS, NUM_SAMPLES)
    residual = fedex_residual(states, RANKS, NUM_SAMPLES, merged)
    expected = reference_residual(states, NUM_SAMPLES, merged)
    assert list(residual) == list(expected)
    for prefix, value in expected.items():
        assert residual[prefix].dtype == torch.float64
        torch.testing.assert_close(residual[prefix], value, atol=1e-12, rtol=1e-12)
    # The clients' exact average has rank up to sum(RANKS) = 9 > R on the 6 x 5 query, so no
    # rank-R global product equals it and the residual cannot vanish. (FlexLoRA's SVD is exact
    # on the 4 x 3 conv, whose residual is therefore zero.)
    assert residual[f"{QUERY}."].abs().max() > 1e-3


def test_keys_and_shapes_match_flora_delta() -> None:
    states = client_states(RANKS)
    residual = fedex_residual(states, RANKS, NUM_SAMPLES, zeropad_merge(states, RANKS, NUM_SAMPLES))
    deltas = flora_delta(states[0])
    assert list(residual) == list(deltas)
    for prefix, delta in deltas.items():
        assert residual[prefix].shape == delta.shape
        assert residual[prefix].dtype == torch.float32
    assert residual[f"{CONV}."].shape == (4, 3, 1, 1)


@pytest.mark.parametrize("merge", [zeropad_merge, fedilora_merge], ids=["zeropad", "fedilora"])
def test_base_plus_global_adapter_is_exact_client_average(merge: Merge) -> None:
    states = client_states(RANKS, dtype=torch.float64)
    merged = merge(states, RANKS, NUM_SAMPLES)
    residual = fedex_residual(states, RANKS, NUM_SAMPLES, merged)
    total = float(sum(NUM_SAMPLES))
    generator = torch.Generator().manual_seed(99)
    for module, (d, k, _) in MODULES.items():
        base = torch.randn(d, k, generator=generator, dtype=torch.float64)
        folded = base + residual[f"{module}."].reshape(d, k)
        client_average = sum(
            (n / total) * (base + product(state, module))
            for n, state in zip(NUM_SAMPLES, states, strict=True)
        )
        torch.testing.assert_close(folded + product(merged, module), client_average)
        torch.testing.assert_close(
            folded + product(merged, module) - base,
            weighted_product_sum(states, NUM_SAMPLES, module),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_client_has_zero_residual(dtype: torch.dtype) -> None:
    states = [build_state(4, seed=5, dtype=dtype)]
    for merged in (zeropad_merge(states, [4], [7]), zeropad_merge(states, [4], [7], global_rank=6)):
        residual = fedex_residual(states, [4], [7], merged)
        for value in residual.values():
            torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-6, rtol=0)


@pytest.mark.parametrize("merge", [zeropad_merge, fedilora_merge], ids=["zeropad", "fedilora"])
def test_identical_clients_have_zero_residual(merge: Merge) -> None:
    state = build_state(3, seed=6)
    states = clone_states([state, state, state])
    merged = merge(states, [3, 3, 3], [1, 5, 2])
    residual = fedex_residual(states, [3, 3, 3], [1, 5, 2], merged)
    assert list(residual) == [f"{module}." for module in MODULES]
    for value in residual.values():
        torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-5, rtol=0)


def test_two_clients_by_hand() -> None:
    # p = (1/4, 3/4); A_1 = [1 2], B_1 = [1 0]^T, A_2 = [3 0], B_2 = [0 2]^T.
    # sum p_i B_i A_i = 1/4 [[1, 2], [0, 0]] + 3/4 [[0, 0], [6, 0]] = [[0.25, 0.5], [4.5, 0]]
    # A_g = [2.5 0.5], B_g = [0.25 1.5]^T, B_g A_g = [[0.625, 0.125], [3.75, 0.75]]
    # residual = [[-0.375, 0.375], [0.75, -0.75]] (= p_1 p_2 (B_1 - B_2)(A_1 - A_2)).
    first = {
        "m.lora_A.weight": torch.tensor([[1.0, 2.0]], dtype=torch.float64),
        "m.lora_B.weight": torch.tensor([[1.0], [0.0]], dtype=torch.float64),
        "head.weight": torch.tensor([1.0], dtype=torch.float64),
    }
    second = {
        "m.lora_A.weight": torch.tensor([[3.0, 0.0]], dtype=torch.float64),
        "m.lora_B.weight": torch.tensor([[0.0], [2.0]], dtype=torch.float64),
        "head.weight": torch.tensor([5.0], dtype=torch.float64),
    }
    merged = {
        "m.lora_A.weight": torch.tensor([[2.5, 0.5]], dtype=torch.float64),
        "m.lora_B.weight": torch.tensor([[0.25], [1.5]], dtype=torch.float64),
        "head.weight": torch.tensor([4.0], dtype=torch.float64),
    }
    residual = fedex_residual([first, second], [1, 1], [1, 3], merged)
    assert list(residual) == ["m."]
    expected = torch.tensor([[-0.375, 0.375], [0.75, -0.75]], dtype=torch.float64)
    torch.testing.assert_close(residual["m."], expected, atol=1e-15, rtol=0)
    # The hand-written merged adapter is zero-padding FedAvg's.
    fedavg = zeropad_merge([first, second], [1, 1], [1, 3])
    for key, tensor in merged.items():
        torch.testing.assert_close(fedavg[key], tensor)


def test_inputs_not_mutated() -> None:
    states = client_states(RANKS)
    merged = fedilora_merge(states, RANKS, NUM_SAMPLES)
    before_states = clone_states(states)
    before_merged = {key: tensor.clone() for key, tensor in merged.items()}
    fedex_residual(states, RANKS, NUM_SAMPLES, merged)
    for state, original in zip(states, before_states, strict=True):
        assert all(torch.equal(state[key], original[key]) for key in original)
        assert list(state) == list(original)
    assert list(merged) == list(before_merged)
    assert all(torch.equal(merged[key], before_merged[key]) for key in before_merged)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_output_keeps_factor_dtype(dtype: torch.dtype) -> None:
    states = client_states(RANKS, dtype=dtype)
    residual = fedex_residual(states, RANKS, NUM_SAMPLES, zeropad_merge(states, RANKS, NUM_SAMPLES))
    assert {value.dtype for value in residual.values()} == {dtype}


def test_merged_missing_a_module_raises() -> None:
    states = client_states(RANKS)
    merged = zeropad_merge(states, RANKS, NUM_SAMPLES)
    del merged[lora_a(QUERY)], merged[lora_b(QUERY)]
    with pytest.raises(ValueError, match=f"lacks module '{QUERY}.'"):
        fedex_residual(states, RANKS, NUM_SAMPLES, merged)


def test_merged_with_wrong_shape_raises() -> None:
    states = client_states(RANKS)
    merged = zeropad_merge(states, RANKS, NUM_SAMPLES)
    merged[lora_b(QUERY)] = torch.zeros(9, 4)
    with pytest.raises(ValueError, match="merged shape \\(9, 4\\) does not fit"):
        fedex_residual(states, RANKS, NUM_SAMPLES, merged)


def test_merged_below_a_client_rank_raises() -> None:
    states = client_states(RANKS)
    merged = zeropad_merge(client_states([2, 2]), [2, 2], [1, 1])
    with pytest.raises(ValueError, match="client 0: rank 4 is outside \\[1, 2\\]"):
        fedex_residual(states, RANKS, NUM_SAMPLES, merged)
