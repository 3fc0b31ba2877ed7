"""Folding peft's scaling into lora_B, and merging clients in the common "s = 1" space."""

import pytest
import torch
from lora_builders import (
    CONV,
    HEAD_W,
    MODULES,
    QUERY,
    build_state,
    lora_a,
    lora_b,
    product,
    same_product_pair,
)

from aggregation import (
    fold_scaling,
    get_merger,
    merge_lora_state_dicts,
    truncate,
    unfold_scaling,
)


def test_fold_scales_only_lora_b_and_unfold_inverts_it() -> None:
    state = build_state(4, seed=0)
    folded = fold_scaling(state, 0.25)
    assert torch.equal(folded[lora_b(QUERY)], state[lora_b(QUERY)] * 0.25)
    assert torch.equal(folded[lora_a(QUERY)], state[lora_a(QUERY)])
    assert torch.equal(folded[HEAD_W], state[HEAD_W])
    back = unfold_scaling(folded, 0.25)
    for key in state:
        torch.testing.assert_close(back[key], state[key])


def test_fold_does_not_mutate_or_alias_input() -> None:
    state = build_state(4, seed=0)
    original = {key: tensor.clone() for key, tensor in state.items()}
    folded = fold_scaling(state, 2.0)
    for tensor in folded.values():
        tensor.zero_()
    for key in state:
        assert torch.equal(state[key], original[key])


@pytest.mark.parametrize("scaling", [0.0, float("inf"), float("nan")])
def test_fold_rejects_irreversible_scaling(scaling: float) -> None:
    with pytest.raises(ValueError, match="finite and non-zero"):
        fold_scaling(build_state(2, seed=0), scaling)
    with pytest.raises(ValueError, match="finite and non-zero"):
        unfold_scaling(build_state(2, seed=0), scaling)


@pytest.mark.parametrize("method", ["fedilora", "zeropad"])
def test_constant_scaling_equal_products_contribute_equally(method: str) -> None:
    small, large = same_product_pair()
    scaling = 0.5  # one constant s for every client, as under ``lora.scaling: constant``
    merged_small = merge_lora_state_dicts(
        [small], [4], [10], method=method, global_rank=32, scalings=[scaling]
    )
    merged_large = merge_lora_state_dicts(
        [large], [32], [10], method=method, global_rank=32, scalings=[scaling]
    )
    for module in MODULES:
        expected = scaling * product(small, module)
        torch.testing.assert_close(product(merged_small, module), expected)
        torch.testing.assert_close(product(merged_large, module), expected)


def test_rank_scaling_folds_the_effective_update() -> None:
    small, large = same_product_pair()
    alpha = 16.0
    scalings = [alpha / 4, alpha / 32]  # peft's per-rank s_i: same B @ A, different dW_i
    merged = [
        merge_lora_state_dicts([state], [rank], [1], global_rank=32, scalings=[s])
        for state, rank, s in zip((small, large), (4, 32), scalings, strict=True)
    ]
    for module in MODULES:
        torch.testing.assert_close(product(merged[0], module), scalings[0] * product(small, module))
        torch.testing.assert_close(product(merged[1], module), scalings[1] * product(large, module))


@pytest.mark.parametrize("method", ["fedilora", "zeropad"])
def test_fold_merge_redistribute_unfold_is_identity_for_one_client(method: str) -> None:
    state = build_state(4, seed=5)
    scaling = 16.0 / 4
    merged = merge_lora_state_dicts(
        [state], [4], [7], method=method, global_rank=8, scalings=[scaling]
    )
    local = unfold_scaling(get_merger(method).redistribute(merged, 4), scaling)
    for key in state:
        torch.testing.assert_close(local[key], state[key])
    assert torch.equal(truncate(merged, 4)[lora_a(CONV)], state[lora_a(CONV)])
