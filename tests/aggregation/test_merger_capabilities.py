"""Capability flags of every merger, and how each merger treats LoRA scaling."""

import pytest
import torch
from lora_builders import (
    MODULES,
    build_state,
    dense_average,
    product,
    same_product_pair,
    scale_b,
    weighted_product_sum,
)

from aggregation import (
    MERGERS,
    FediLoRAMerger,
    FlexLoRAMerger,
    FLoRAMerger,
    HetLoRAMerger,
    RaFLoRAMerger,
    RankMerger,
    ZeroPadMerger,
    flora_delta,
    get_merger,
    hetlora_weights,
    merge_lora_state_dicts,
)

FLAGS = ("needs_pairs", "linear_in_factors", "fixed_rank", "fresh_adapter_each_round")


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (ZeroPadMerger, (False, True, True, False)),
        (FediLoRAMerger, (False, True, True, False)),
        (HetLoRAMerger, (True, True, True, False)),
        (FlexLoRAMerger, (True, False, True, False)),
        (FLoRAMerger, (True, False, False, True)),
        (RaFLoRAMerger, (True, False, True, False)),
    ],
)
def test_capability_flags(cls: type[RankMerger], expected: tuple[bool, ...]) -> None:
    assert tuple(getattr(cls, flag) for flag in FLAGS) == expected
    assert tuple(getattr(cls(), flag) for flag in FLAGS) == expected


def test_base_class_flags_are_conservative() -> None:
    assert tuple(getattr(RankMerger, flag) for flag in FLAGS) == (False, False, True, False)


def test_every_registered_merger_is_covered_by_the_flag_table() -> None:
    assert set(MERGERS) == {
        "zeropad",
        "fedilora",
        "fedilora_damped",
        "hetlora",
        "flexlora",
        "flora",
        "raflora",
    }


def test_same_product_pair_really_has_equal_products() -> None:
    small, large = same_product_pair()
    for module in MODULES:
        torch.testing.assert_close(product(large, module), product(small, module))


@pytest.mark.parametrize("method", sorted(MERGERS))
def test_constant_scaling_rank_4_and_32_with_equal_products_contribute_equally(
    method: str,
) -> None:
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
        torch.testing.assert_close(product(merged_small, module), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(product(merged_large, module), expected, atol=1e-5, rtol=1e-5)


def test_constant_scaling_equal_products_get_equal_hetlora_weights() -> None:
    small, large = same_product_pair()
    other = build_state(8, seed=9)
    torch.testing.assert_close(
        hetlora_weights([small, other], [10, 30]), hetlora_weights([large, other], [10, 30])
    )


@pytest.mark.parametrize("method", ["flexlora", "flora"])
def test_product_mergers_see_only_products_beside_other_clients(method: str) -> None:
    small, large = same_product_pair()
    other = build_state(8, seed=9)
    merged = [
        merge_lora_state_dicts(
            [state, other], [rank, 8], [10, 30], method=method, global_rank=32, svd="exact"
        )
        for state, rank in ((small, 4), (large, 32))
    ]
    for module in MODULES:
        torch.testing.assert_close(
            product(merged[0], module), product(merged[1], module), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("method", sorted(MERGERS))
def test_rank_scaling_single_client_merges_its_effective_update(method: str) -> None:
    small, large = same_product_pair()
    for state, rank in ((small, 4), (large, 32)):
        scaling = 16.0 / rank  # peft's per-rank s_i: same B @ A, different dW_i
        merged = merge_lora_state_dicts(
            [state], [rank], [1], method=method, global_rank=32, scalings=[scaling]
        )
        for module in MODULES:
            torch.testing.assert_close(
                product(merged, module), scaling * product(state, module), atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("method", ["flexlora", "flora"])
def test_rank_scaling_fold_equals_merging_scaled_products(method: str) -> None:
    # Two clients: folding s_i into B_i must give sum_i p_i s_i B_i A_i, formed here directly.
    # R = 32 exceeds min(d, k) of every module, so FlexLoRA's SVD keeps the whole update.
    small, large = same_product_pair()
    other = build_state(8, seed=9)
    states, ranks, counts = [small, other], [4, 8], [10, 30]
    scalings = [16.0 / rank for rank in ranks]
    merged = merge_lora_state_dicts(
        states, ranks, counts, method=method, global_rank=32, scalings=scalings, svd="exact"
    )
    scaled = [scale_b(state, s) for state, s in zip(states, scalings, strict=True)]
    for module in MODULES:
        expected = weighted_product_sum(scaled, counts, module)
        torch.testing.assert_close(product(merged, module), expected, atol=1e-5, rtol=1e-5)
    if method == "flora":
        deltas = flora_delta(merged)
        for module, (d, k, _) in MODULES.items():
            torch.testing.assert_close(
                deltas[f"{module}."].reshape(d, k).double(),
                weighted_product_sum(scaled, counts, module),
                atol=1e-5,
                rtol=1e-5,
            )


@pytest.mark.parametrize("method", ["zeropad", "fedilora", "hetlora"])
def test_rank_scaling_fold_equals_merging_hand_scaled_factors(method: str) -> None:
    small, large = same_product_pair()
    other = build_state(8, seed=9)
    states, ranks, counts = [large, other], [32, 8], [10, 30]
    scalings = [16.0 / rank for rank in ranks]
    merged = merge_lora_state_dicts(
        states, ranks, counts, method=method, global_rank=32, scalings=scalings
    )
    scaled = [scale_b(state, s) for state, s in zip(states, scalings, strict=True)]
    expected = get_merger(method).merge(scaled, ranks, counts, global_rank=32)
    for module in MODULES:
        torch.testing.assert_close(product(merged, module), product(expected, module))
    for key in ("base_model.model.head.weight", "base_model.model.head.bias"):
        torch.testing.assert_close(merged[key].double(), dense_average(states, counts, key))
